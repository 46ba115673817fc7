"""A real training run: a small conv net on scikit-learn's digits (8x8
images, 10 classes), trained once with torch.nn.BatchNorm2d and once with
normserve.torch.BatchNorm2d from the same seed. The loss curves agree step
by step and the final test accuracies match."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import normserve.torch as nst

EPOCHS = 3
BATCH = 64
LOSS_TOLERANCE = 1e-5  # Per step, relative and absolute (seen 1e-7).


def make_model(batch_norm, memory_format):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), batch_norm(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), batch_norm(16),
        nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).to(
            memory_format=memory_format)


def train(model, x_train, y_train, x_test, y_test):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                          weight_decay=1e-4)
    generator = torch.Generator().manual_seed(1)
    losses = []
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), BATCH):
            index = order[start:start + BATCH]
            if len(index) < 2:
                continue
            loss = nn.functional.cross_entropy(model(x_train[index]),
                                               y_train[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        predictions = model(x_test).argmax(dim=1)
    return np.array(losses), predictions


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    split = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))
    train_index, test_index = split[:1500], split[1500:]
    return x[train_index], y[train_index], x[test_index], y[test_index]


# With channels_last the convolutions hand BatchNorm NHWC activations. The
# reference is always torch's contiguous run: torch 1.13's channels-last CPU
# BatchNorm rounds differently from its own contiguous kernel (its loss
# curve leaves the contiguous one after ~25 steps and differs by 3.5e-3 after
# 72), while normserve's NHWC run stays within 1e-7 of the contiguous one.
@pytest.mark.parametrize("memory_format", [torch.contiguous_format,
                                           torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_digits_training_matches_torch(client, digits, memory_format):
    x_train, y_train, x_test, y_test = digits
    reference = make_model(nn.BatchNorm2d, torch.contiguous_format)
    ref_losses, ref_predictions = train(reference, *digits)
    remote = make_model(lambda c: nst.BatchNorm2d(c, client=client),
                        memory_format)
    seen = set()
    for index in (1, 4):
        remote[index].register_forward_pre_hook(
            lambda module, inputs: seen.add(
                nst.to_wire(inputs[0]).layout))
    our_losses, our_predictions = train(
        remote, *(t.contiguous(memory_format=memory_format) if t.dim() == 4
                  else t for t in digits))

    assert len(our_losses) == len(ref_losses) == EPOCHS * 24
    assert seen == {nst.pb.LAYOUT_NHWC if memory_format == torch.channels_last
                    else nst.pb.LAYOUT_NCHW}
    assert ref_losses[-10:].mean() < 0.5 * ref_losses[:10].mean()  # Learned.
    np.testing.assert_allclose(our_losses, ref_losses, rtol=LOSS_TOLERANCE,
                               atol=LOSS_TOLERANCE)
    ref_accuracy = (ref_predictions == y_test).float().mean().item()
    our_accuracy = (our_predictions == y_test).float().mean().item()
    assert ref_accuracy > 0.9
    assert our_accuracy == ref_accuracy
    assert torch.equal(our_predictions, ref_predictions)

    # The server's running statistics are the reference's.
    for ref_bn, our_bn in ((reference[1], remote[1]),
                           (reference[4], remote[4])):
        assert int(our_bn.num_batches_tracked) == int(
            ref_bn.num_batches_tracked) == len(ref_losses)
        torch.testing.assert_close(our_bn.running_mean, ref_bn.running_mean,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(our_bn.running_var, ref_bn.running_var,
                                   rtol=1e-4, atol=1e-4)
        our_bn.close()
