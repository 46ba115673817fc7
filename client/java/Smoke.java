// Drives a normserve server from Java with the stubs that `make stubs`
// generates (scripts/stubs.sh): creates a BatchNorm layer, runs a training
// Forward on a raw float32 NCHW input, then a Backward, and prints an FNV-1a
// 64 checksum of each result's bytes as the server sent them.
//
//   java -cp CLASSPATH Smoke --address=127.0.0.1:50051 --layer=bn0 \
//       --shape=2,3,4,4 --input=x.f32 --grad_output=dy.f32
//
// The layer's num_features is the shape's C unless --num_features says
// otherwise (a mismatch makes Forward fail with INVALID_ARGUMENT).
// A failed call prints "error: CODE: message" and exits 1; a usage error
// exits 2.

import com.google.protobuf.ByteString;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.StatusRuntimeException;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.HashMap;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import normserve.v1.NormalizationGrpc;
import normserve.v1.Normserve.BackwardRequest;
import normserve.v1.Normserve.BackwardResponse;
import normserve.v1.Normserve.BatchNormConfig;
import normserve.v1.Normserve.CreateLayerRequest;
import normserve.v1.Normserve.DType;
import normserve.v1.Normserve.ForwardRequest;
import normserve.v1.Normserve.ForwardResponse;
import normserve.v1.Normserve.Layer;
import normserve.v1.Normserve.Layout;
import normserve.v1.Normserve.Tensor;

public final class Smoke {
  private static final String USAGE =
      "usage: Smoke [--address=HOST:PORT] [--layer=ID] [--num_features=C]"
          + " --shape=N,C[,D,H,W] --input=FILE --grad_output=FILE"
          + " [--timeout_ms=N]";

  private Smoke() {}

  /** FNV-1a 64 over the bytes, as normserve-cli prints it. */
  static long fnv1a64(ByteString data) {
    long hash = 0xcbf29ce484222325L;
    for (int i = 0; i < data.size(); i++) {
      hash ^= data.byteAt(i) & 0xff;
      hash *= 0x100000001b3L;
    }
    return hash;
  }

  /** A raw little-endian float32 file of prod(shape) values, as NCHW. */
  static Tensor readTensor(String path, long[] shape) throws IOException {
    byte[] data = Files.readAllBytes(Paths.get(path));
    long count = 1;
    for (long dim : shape) {
      count *= dim;
    }
    if (data.length != count * 4) {
      throw new IllegalArgumentException(
          path + " has " + data.length + " bytes; the shape needs " + count * 4);
    }
    Tensor.Builder tensor =
        Tensor.newBuilder()
            .setDtype(DType.DTYPE_FLOAT32)
            .setLayout(Layout.LAYOUT_NCHW)
            .setData(ByteString.copyFrom(data));
    for (long dim : shape) {
      tensor.addShape(dim);
    }
    return tensor.build();
  }

  static long[] parseShape(String text) {
    String[] parts = text.split(",");
    if (parts.length < 2 || parts.length > 5) {
      throw new IllegalArgumentException("--shape needs 2 to 5 dims, got '" + text + "'");
    }
    long[] shape = new long[parts.length];
    for (int i = 0; i < parts.length; i++) {
      shape[i] = Long.parseLong(parts[i]);
      if (shape[i] <= 0) {
        throw new IllegalArgumentException("--shape: bad dim in '" + text + "'");
      }
    }
    return shape;
  }

  /** --name=value or --name value. */
  static Map<String, String> parseFlags(String[] args) {
    Map<String, String> flags = new HashMap<>();
    for (int i = 0; i < args.length; i++) {
      if (!args[i].startsWith("--")) {
        throw new IllegalArgumentException("unexpected argument '" + args[i] + "'");
      }
      String arg = args[i].substring(2);
      int eq = arg.indexOf('=');
      if (eq >= 0) {
        flags.put(arg.substring(0, eq), arg.substring(eq + 1));
      } else if (i + 1 < args.length) {
        flags.put(arg, args[++i]);
      } else {
        throw new IllegalArgumentException("--" + arg + " needs a value");
      }
    }
    return flags;
  }

  public static void main(String[] args) throws InterruptedException {
    String address;
    String layerId;
    long[] shape;
    long numFeatures;
    Tensor input;
    Tensor gradOutput;
    long timeoutMs;
    try {
      Map<String, String> flags = parseFlags(args);
      address = flags.getOrDefault("address", "127.0.0.1:50051");
      layerId = flags.getOrDefault("layer", "");
      timeoutMs = Long.parseLong(flags.getOrDefault("timeout_ms", "30000"));
      if (!flags.containsKey("shape") || !flags.containsKey("input")
          || !flags.containsKey("grad_output")) {
        throw new IllegalArgumentException("needs --shape, --input and --grad_output");
      }
      shape = parseShape(flags.get("shape"));
      numFeatures = Long.parseLong(flags.getOrDefault("num_features", "0"));
      if (numFeatures == 0) {
        numFeatures = shape[1];
      }
      input = readTensor(flags.get("input"), shape);
      gradOutput = readTensor(flags.get("grad_output"), shape);
    } catch (IllegalArgumentException | IOException e) {
      System.err.println("error: " + e.getMessage() + "\n" + USAGE);
      System.exit(2);
      return;
    }

    ManagedChannel channel = ManagedChannelBuilder.forTarget(address).usePlaintext().build();
    int exitCode = 0;
    try {
      NormalizationGrpc.NormalizationBlockingStub stub = NormalizationGrpc.newBlockingStub(channel);
      Layer layer =
          stub.withDeadlineAfter(timeoutMs, TimeUnit.MILLISECONDS)
              .createLayer(
                  CreateLayerRequest.newBuilder()
                      .setLayerId(layerId)
                      .setBatchNorm(BatchNormConfig.newBuilder().setNumFeatures(numFeatures))
                      .build());

      ForwardResponse forward =
          stub.withDeadlineAfter(timeoutMs, TimeUnit.MILLISECONDS)
              .forward(
                  ForwardRequest.newBuilder()
                      .setName(layer.getName())
                      .setInput(input)
                      .setTraining(true)
                      .setSaveForBackward(true)
                      .build());
      System.out.printf("forward: fnv1a64=%016x%n", fnv1a64(forward.getOutput().getData()));

      BackwardResponse backward =
          stub.withDeadlineAfter(timeoutMs, TimeUnit.MILLISECONDS)
              .backward(
                  BackwardRequest.newBuilder()
                      .setName(layer.getName())
                      .setHandle(forward.getHandle())
                      .setGradOutput(gradOutput)
                      .build());
      System.out.printf(
          "backward: fnv1a64=%016x%n", fnv1a64(backward.getGradInput().getData()));
    } catch (StatusRuntimeException e) {
      System.err.println(
          "error: " + e.getStatus().getCode() + ": " + e.getStatus().getDescription());
      exitCode = 1;
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    System.exit(exitCode);
  }
}
