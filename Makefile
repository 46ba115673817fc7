# Thin wrapper over CMake. `make demo` and `make test` install what is
# missing (Debian 12), build, and run.
BUILD_DIR ?= build
BUILD_TYPE ?= Release
JOBS ?= $(shell nproc)
ADDRESS ?= 127.0.0.1:50051
DEVICE ?= auto

.PHONY: all deps configure build demo serve test image-test clean format bench load fuzz test-asan soak \
	python-wheel node-pack stubs install

all: build

deps:
	@scripts/install-deps.sh

configure: deps
	@if [ ! -f $(BUILD_DIR)/CMakeCache.txt ]; then \
	  cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) >/dev/null; \
	fi

build: configure
	@cmake --build $(BUILD_DIR) -j$(JOBS)

# Starts the server, drives it with the C++ demo client, stops it.
demo: build
	@NORMSERVE_ADDRESS=$(ADDRESS) NORMSERVE_DEVICE=$(DEVICE) \
	  scripts/demo.sh $(BUILD_DIR)/bin

# Runs the server in the foreground (Ctrl-C stops it).
serve: build
	$(BUILD_DIR)/bin/normserve --address $(ADDRESS) --device $(DEVICE) $(ARGS)

# The fuzzer's fixed-size run first (the same inputs every time), then
# ctest, whose counts close the output.
test: build
	@FUZZ_RUNS=$(FUZZ_TEST_RUNS) scripts/fuzz.sh
	@scripts/run-ctest.sh $(BUILD_DIR) --output-on-failure -j$(JOBS) \
	  --timeout 600

# The request fuzzer's run in `make test`: FUZZ_TEST_RUNS inputs from a
# fixed seed; `make fuzz` runs it for FUZZ_SECONDS (scripts/fuzz.sh; clang
# 14, ASan, UBSan, build-fuzz/).
FUZZ_TEST_RUNS ?= 1000000
FUZZ_SECONDS ?= 600

# Benchmarks, not part of `make test`: kernels against PyTorch and copy
# bandwidth, the service against a plain gRPC echo under each allocator
# (bench/run_bench.py; BENCH_ARGS=--quick for a short run).
bench: build
	@/usr/bin/python3 bench/run_bench.py --bin $(BUILD_DIR)/bin \
	  --out $(BUILD_DIR)/reports $(BENCH_ARGS)

# A short load sweep against a server it starts; leaves load.json, load.csv
# and load.png in $(BUILD_DIR)/reports (LOAD_ARGS adds normserve-load flags).
load: build
	@bench/load/run_load.sh $(BUILD_DIR)/bin $(BUILD_DIR)/reports $(LOAD_ARGS)

# Builds the cpu container image with podman from a local Debian 12 base and
# checks its server and CLI (deploy/docker/image_test.sh; root; about 5
# minutes cold, not part of `make test`).
image-test:
	@BUILD_DIR=$(BUILD_DIR) deploy/docker/image_test.sh

# --- clients as packages (issue 17) ---------------------------------------

# The Python client as a wheel with its generated stubs, in
# $(BUILD_DIR)/dist (scripts/python-wheel.sh; offline, Debian's tools).
python-wheel: build
	@scripts/python-wheel.sh $(BUILD_DIR)

# The Node client as an npm tarball, proto and TypeScript declarations
# inside, in $(BUILD_DIR)/dist (scripts/node-pack.sh).
node-pack: deps
	@scripts/node-pack.sh $(BUILD_DIR)

# Go and Java stubs and their smoke programs, in $(BUILD_DIR)/stubs
# (scripts/stubs.sh).
stubs: build
	@scripts/stubs.sh $(BUILD_DIR)

# Headers, libnormserve_client, its CMake package and pkg-config file under
# PREFIX (default /usr/local).
PREFIX ?= /usr/local
install: build
	@cmake --install $(BUILD_DIR) --prefix $(PREFIX)

format:
	@git ls-files '*.cc' '*.h' | xargs clang-format -i

clean:
	rm -rf $(BUILD_DIR)

# --- reliability and security (issue 6) -----------------------------------

fuzz: deps
	@scripts/fuzz.sh $(FUZZ_SECONDS)

# The in-process server tests again under ASan and UBSan (build-asan/, CPU
# only, only the targets it runs; scripts/test-asan.sh). Run by .ci/run.
test-asan: deps
	@scripts/test-asan.sh

# Ten minutes of load with create/delete churn, cancellations and
# timeouts against a real server; reports its RSS growth after warm-up
# (scripts/soak.sh; SOAK_SECONDS). Not in CI.
SOAK_SECONDS ?= 600
soak: build
	@scripts/soak.sh $(BUILD_DIR)/bin $(SOAK_SECONDS)

