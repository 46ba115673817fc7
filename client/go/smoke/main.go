// Command smoke drives a normserve server from Go with the stubs that
// `make stubs` generates (scripts/stubs.sh): it creates a BatchNorm layer,
// runs a training Forward on a raw float32 NCHW input, then a Backward, and
// prints an FNV-1a 64 checksum of each result's bytes as the server sent
// them.
//
//	smoke --address=127.0.0.1:50051 --layer=bn0 --shape=2,3,4,4 \
//	    --input=x.f32 --grad_output=dy.f32
//
// The layer's num_features is the shape's C unless --num_features says
// otherwise (a mismatch makes Forward fail with INVALID_ARGUMENT).
//
// A failed call prints "error: CODE: message" and exits 1; a usage error
// exits 2.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "normserve/v1"
)

// fnv1a64 is FNV-1a 64 over data, as normserve-cli prints it.
func fnv1a64(data []byte) uint64 {
	hash := uint64(0xcbf29ce484222325)
	for _, b := range data {
		hash ^= uint64(b)
		hash *= 0x100000001b3
	}
	return hash
}

// parseShape parses "N,C,H,W" (any rank from 2 to 5).
func parseShape(text string) ([]int64, error) {
	var shape []int64
	for _, part := range strings.Split(text, ",") {
		dim, err := strconv.ParseInt(part, 10, 64)
		if err != nil || dim <= 0 {
			return nil, fmt.Errorf("--shape: bad dim %q in %q", part, text)
		}
		shape = append(shape, dim)
	}
	if len(shape) < 2 || len(shape) > 5 {
		return nil, fmt.Errorf("--shape needs 2 to 5 dims, got %q", text)
	}
	return shape, nil
}

// readTensor reads a raw little-endian float32 file holding prod(shape)
// values into an NCHW float32 Tensor; the bytes go out unchanged.
func readTensor(path string, shape []int64) (*pb.Tensor, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	count := int64(1)
	for _, dim := range shape {
		count *= dim
	}
	if int64(len(data)) != count*4 {
		return nil, fmt.Errorf("%s has %d bytes; the shape needs %d", path,
			len(data), count*4)
	}
	return &pb.Tensor{Shape: shape, Dtype: pb.DType_DTYPE_FLOAT32,
		Layout: pb.Layout_LAYOUT_NCHW, Data: data}, nil
}

// codeName spells a gRPC code as the C++ CLI does: InvalidArgument ->
// INVALID_ARGUMENT.
func codeName(name string) string {
	var out []rune
	for i, r := range name {
		if i > 0 && unicode.IsUpper(r) && unicode.IsLower(rune(name[i-1])) {
			out = append(out, '_')
		}
		out = append(out, unicode.ToUpper(r))
	}
	return string(out)
}

func usage(err error) {
	fmt.Fprintf(os.Stderr, "error: %v\n", err)
	flag.Usage()
	os.Exit(2)
}

func main() {
	address := flag.String("address", "127.0.0.1:50051", "server HOST:PORT")
	layerID := flag.String("layer", "", "id of the layer to create (\"\": the server picks)")
	numFeatures := flag.Int64("num_features", 0, "the layer's C (0: the shape's C)")
	shapeFlag := flag.String("shape", "", "input shape N,C[,D,H,W]")
	inputPath := flag.String("input", "", "raw little-endian float32 input, NCHW")
	gradPath := flag.String("grad_output", "", "raw little-endian float32 grad_output, NCHW")
	timeoutMs := flag.Int64("timeout_ms", 30000, "deadline of each call in ms")
	flag.Parse()
	if flag.NArg() != 0 || *shapeFlag == "" || *inputPath == "" || *gradPath == "" {
		usage(fmt.Errorf("needs --shape, --input and --grad_output"))
	}
	shape, err := parseShape(*shapeFlag)
	if err != nil {
		usage(err)
	}
	input, err := readTensor(*inputPath, shape)
	if err != nil {
		usage(err)
	}
	gradOutput, err := readTensor(*gradPath, shape)
	if err != nil {
		usage(err)
	}
	if *numFeatures == 0 {
		*numFeatures = shape[1]
	}
	if err := run(*address, *layerID, *numFeatures, input, gradOutput,
		time.Duration(*timeoutMs)*time.Millisecond); err != nil {
		st := status.Convert(err)
		fmt.Fprintf(os.Stderr, "error: %s: %s\n", codeName(st.Code().String()),
			st.Message())
		os.Exit(1)
	}
}

func run(address, layerID string, numFeatures int64, input, gradOutput *pb.Tensor,
	timeout time.Duration) error {
	// Plaintext; Debian's grpc-go (1.33) has WithInsecure, not the newer
	// credentials/insecure package.
	conn, err := grpc.Dial(address, grpc.WithInsecure())
	if err != nil {
		return err
	}
	defer conn.Close()
	client := pb.NewNormalizationClient(conn)
	call := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), timeout)
	}

	ctx, cancel := call()
	defer cancel()
	layer, err := client.CreateLayer(ctx, &pb.CreateLayerRequest{
		LayerId: layerID,
		Config: &pb.CreateLayerRequest_BatchNorm{
			BatchNorm: &pb.BatchNormConfig{NumFeatures: numFeatures}},
	})
	if err != nil {
		return err
	}

	ctx, cancel = call()
	defer cancel()
	forward, err := client.Forward(ctx, &pb.ForwardRequest{
		Name:            layer.Name,
		Input:           input,
		Training:        true,
		SaveForBackward: proto.Bool(true),
	})
	if err != nil {
		return err
	}
	fmt.Printf("forward: fnv1a64=%016x\n", fnv1a64(forward.Output.GetData()))

	ctx, cancel = call()
	defer cancel()
	backward, err := client.Backward(ctx, &pb.BackwardRequest{
		Name:       layer.Name,
		Handle:     forward.Handle,
		GradOutput: gradOutput,
	})
	if err != nil {
		return err
	}
	fmt.Printf("backward: fnv1a64=%016x\n", fnv1a64(backward.GradInput.GetData()))
	return nil
}
