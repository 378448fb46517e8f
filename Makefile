# isomesh: the two commands a new user needs are `make demo` and `make test`.
# Everything else here is a step of those two.

CARGO ?= cargo
# What the native (x86_64) builds and tests select: the whole workspace but the guest, which is
# built for Wasm (`module`, `guest-test`). Selected natively, its tract would be resolved into
# the features of crates the binaries share (cranelift's among them), so a build that selects it
# and one that does not compile those twice.
NATIVE := --workspace --exclude isomesh-guest
# One build serves everything: the binaries are static (musl), so the very files the tests and
# the demo run are the ones the container images ship (stripped on the way in).
TARGET := x86_64-unknown-linux-musl
BIN := target/$(TARGET)/release
MODULE := target/wasm32-wasip1/release/isomesh_guest.wasm
MODULE_V2 := target/modules/mobilenet_v2-0.2.0.wasm
# The ARM device tier: the same static node for aarch64, cross-built with cargo-zigbuild (zig is
# the C compiler for musl; scripts/setup.sh installs it), run here under qemu.
ARM_TARGET := aarch64-unknown-linux-musl
ARM_BIN := target/$(ARM_TARGET)/release
# zig compiles the C (ring, mimalloc); the toolchain's own rust-lld links, against the musl that
# ships with Rust's aarch64 musl target. zig as the linker would first build its own musl libc,
# compiler-rt and libunwind from source: 3-4 minutes of a fresh build on 2 cores, for nothing.
ARM_LINK := CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld

.PHONY: demo test setup module module-variants build build-native guest-test arm64-node arm64 images compose-test unit integration lint deny deny-tool checks-build bench bench-quick bench-python report clean-demo fuzz fuzz-build

## Run the whole mesh (embedded broker + device, edge, cloud nodes) on the shared photos.
demo: setup module build
	./scripts/demo.sh $(BIN)

## Unit tests (the classifier's in Wasm: guest-test), the integration suite against
## isomesh-broker (beside it, the container fault tests of the compose mesh: real containers,
## built by `make images`, an arm64 device among them) and again against Mosquitto (with the
## aarch64 node under qemu in the mixed-ISA tests).
# Every cargo command selects the same packages (NATIVE) so features resolve once and target/ is
# reused; the guest's own tests ran in Wasm (guest-test).
# Tests of isomesh-broker alone (`isomesh_broker_only`) are filtered out of the Mosquitto run,
# so cargo reports them as filtered out there rather than passed.
# The compose suite runs beside the first integration run: they share no broker, port or compose
# project, and each spends much of its time waiting on its own processes (brokers and nodes;
# containers), leaving CPU the other uses. In a fresh-clone .ci/run here they took 454 s
# (integration) and 562 s (compose) side by side, 9.4 min, where the run before took 6.1 and
# 7.5 min one after the other (docs/tests.md). The compose suite's output goes to
# $(COMPOSE_LOG), printed once both end so the two do not interleave. The test binaries are
# built first: cargo builds one thing at a time anyway.
COMPOSE_LOG := target/compose-test.log
test: setup module build arm64-node images guest-test
	$(CARGO) test --release --target $(TARGET) $(NATIVE) --lib --bins --test integration --test compose --no-run
	@echo "make test: the compose suite runs beside the isomesh-broker run; its output follows that run's"
	@$(CARGO) test --release --target $(TARGET) $(NATIVE) --test compose -- --nocapture >$(COMPOSE_LOG) 2>&1 & compose=$$!; \
	ISOMESH_TEST_BROKER=isomesh $(CARGO) test --release --target $(TARGET) $(NATIVE) --lib --bins --test integration; integration=$$?; \
	wait $$compose; composed=$$?; \
	echo "---- make test: the compose suite, run beside the run above ($(COMPOSE_LOG)) ----"; \
	cat $(COMPOSE_LOG); \
	echo "make test: integration on isomesh-broker exited $$integration, compose $$composed"; \
	test $$integration -eq 0 && test $$composed -eq 0
	ISOMESH_TEST_BROKER=mosquitto $(CARGO) test --release --target $(TARGET) $(NATIVE) --test integration -- --skip isomesh_broker_only

## The container images of compose.yaml (static musl binaries + module, FROM scratch; no
## registry), and isomesh:arm64, the linux/arm64 device node.
images: setup module build arm64-node
	./scripts/images.sh $(BIN) $(ARM_BIN)

## Only the container fault tests of the compose mesh.
compose-test: module build arm64-node images
	$(CARGO) test --release --target $(TARGET) $(NATIVE) --test compose -- --nocapture

setup:
	./scripts/setup.sh

## The classifier module (one .wasm for every tier); simd128 comes from .cargo/config.toml.
# Also the same classifier at version 0.2.0, the module that tests, the demo and the benchmark
# roll out. It is built first (only when the guest changed), so target/ ends on version 0.1.0.
module: setup $(MODULE_V2)
	$(CARGO) build --release -p isomesh-guest --target wasm32-wasip1
	@ls -l $(MODULE) $(MODULE_V2)

$(MODULE_V2): $(shell find guest -type f -not -path '*/target/*') models/MANIFEST.tsv
	ISOMESH_MODULE_VERSION=0.2.0 $(CARGO) build --release -p isomesh-guest --target wasm32-wasip1
	mkdir -p target/modules
	cp $(MODULE) $@

build: setup
	$(CARGO) build --release --target $(TARGET) $(NATIVE) --bins

## The same, with the native tract baseline of `isomesh bench infer` in isomesh-bench (tract for
## this machine: ~6 CPU-minutes of a fresh build on 2 cores that nothing else needs).
build-native: setup
	$(CARGO) build --release --target $(TARGET) $(NATIVE) --bins --features isomesh-bench/native-baseline

## The classifier's unit tests, run as the module runs: built for wasm32-wasip1 on the module's
## own dependency build, and run in wasmtime with WASI by isomesh-wasi-run (testkit), cargo's
## runner for that target here. Natively they would need tract built for this machine too.
guest-test: setup module build
	CARGO_TARGET_WASM32_WASIP1_RUNNER=$(abspath $(BIN))/isomesh-wasi-run $(CARGO) test --release -p isomesh-guest --target wasm32-wasip1 --lib

## The aarch64 node alone: what the mixed-ISA tests and the arm64 image run. The slow part of
## a fresh build (wasmtime and its Cranelift for aarch64: ~12 min on 2 cores), so only the node.
arm64-node: setup
	$(ARM_LINK) $(CARGO) zigbuild --release --target $(ARM_TARGET) -p isomesh-node

## Everything for an aarch64 host (a Raspberry Pi, say): node, isomesh and isomesh-broker, in
## $(ARM_BIN).
# Linked by zig, as built and run before: rust-lld (ARM_LINK) is checked with the node alone,
# and the broker links aws-lc's C as well.
arm64: setup
	$(CARGO) zigbuild --release --target $(ARM_TARGET) -p isomesh-node -p isomesh-cli -p isomesh-broker

## rustfmt and clippy (-D warnings). Clippy checks in a target directory of its own: a check
## shares no artefact with a build anyway, and so it never waits for a build or a test run of
## target/ (cargo locks a target directory while it builds), nor makes one wait.
LINT_TARGET_DIR := target/lint
lint:
	$(CARGO) fmt --all -- --check
	CARGO_TARGET_DIR=$(LINT_TARGET_DIR) $(CARGO) clippy --release --workspace --all-targets --all-features -- -D warnings

## Licences, banned crates and sources of every dependency (deny.toml); cargo-deny from crates.io
## when missing. Advisories need GitHub (see deny.toml).
deny: deny-tool
	$(CARGO) deny check licenses bans sources

# cargo-deny and cargo-fuzz are built unoptimised (--debug) and without debug info: they run for
# seconds, and an optimised build of each takes minutes of CI, as does writing their debug info.
TOOL_INSTALL := CARGO_PROFILE_DEV_DEBUG=false $(CARGO) install --locked --debug
deny-tool:
	command -v cargo-deny >/dev/null || $(TOOL_INSTALL) cargo-deny

## What the checks after the tests compile, without running them: cargo-deny and cargo-fuzz, the
## instrumented fuzz targets and clippy's check. .ci/run starts it beside `make test` at the
## lowest CPU priority, so it takes only the CPU the tests leave idle (they wait on brokers,
## nodes and containers: a third of two cores, measured), and those checks then only run.
checks-build: setup deny-tool fuzz-build lint

## The paper's evaluation and ours, one run each (docs/evaluation.md): inference per tier CPU
## limit (Wasm vs native tract vs onnxruntime) and the call-overhead ladder; a rollout under load
## vs process restarts (with precompiled code, then with every node compiling), with an aarch64
## node under qemu (with its precompiled code, then compiling itself), and vs a
## container restart in the compose mesh; the offload policies under Poisson load; mesh latency,
## throughput and scaling for 1/2/4 nodes on isomesh-broker, Mosquitto and three clustered
## isomesh-brokers, and node memory.
## CPU quotas need root. JSON in bench-out/, then docs/benchmarks.md and its plots.
BENCH_OUT ?= bench-out
# The photos (photos/, with their sources and reference answers), or $ISOMESH_IMAGES.
ISOMESH_IMAGES ?= photos
PHOTOS := $(wildcard $(ISOMESH_IMAGES)/*.jp*g)
# The issue's ~100 KB photos for the mesh run.
MESH_PHOTOS := $(filter %/banana.jpg %/cat_720p.jpg %/elephants.jpg,$(PHOTOS))
ISOMESH := ./$(BIN)/isomesh
# build-native after the images' build (`build`, which it depends on): the same binaries, and
# isomesh-bench with the native tract baseline.
bench: module images bench-python
	$(MAKE) build-native module-variants
	mkdir -p target/bench-cache
	$(ISOMESH) bench infer --module $(MODULE) --cache-dir target/bench-cache --onnxruntime $(ONNX) --variant relaxed-simd=$(MODULE_RELAXED) --out $(BENCH_OUT)/infer.json $(PHOTOS)
	$(ISOMESH) bench infer --module $(MODULE) --cache-dir target/bench-cache --onnxruntime $(ONNX) --iterations 5 --cpu-cores 0.25 --out $(BENCH_OUT)/infer-device.json $(PHOTOS)
	$(ISOMESH) bench infer --module $(MODULE) --cache-dir target/bench-cache --onnxruntime $(ONNX) --iterations 5 --cpu-cores 0.5 --out $(BENCH_OUT)/infer-edge.json $(PHOTOS)
	$(ISOMESH) bench infer --module $(MODULE) --cache-dir target/bench-cache --onnxruntime $(ONNX) --iterations 5 --cpu-cores 1 --out $(BENCH_OUT)/infer-cloud.json $(PHOTOS)
	$(ISOMESH) bench swap --before-s 20 --from $(MODULE) --to $(MODULE_V2) --out $(BENCH_OUT)/swap.json $(PHOTOS)
	$(ISOMESH) bench swap --before-s 20 --no-precompile --from $(MODULE) --to $(MODULE_V2) --out $(BENCH_OUT)/swap-compile.json $(PHOTOS)
	$(ISOMESH) bench swap --before-s 20 --from $(MODULE) --to $(MODULE) --model $(ONNX) --labels $(LABELS) --out $(BENCH_OUT)/swap-model.json $(PHOTOS)
	$(ISOMESH) bench swap --before-s 20 --arm64 $(ARM_BIN)/isomesh-node --from $(MODULE) --to $(MODULE_V2) --out $(BENCH_OUT)/swap-arm64.json $(PHOTOS)
	$(ISOMESH) bench swap --before-s 20 --arm64 $(ARM_BIN)/isomesh-node --no-precompile --from $(MODULE) --to $(MODULE_V2) --out $(BENCH_OUT)/swap-arm64-compile.json $(PHOTOS)
	python3 scripts/bench_container.py --isomesh $(ISOMESH) --out $(BENCH_OUT)/container.json
	$(ISOMESH) bench offload --module $(MODULE) --cache-dir target/bench-cache --out $(BENCH_OUT)/offload.json $(PHOTOS)
	$(ISOMESH) bench offload --module $(MODULE) --cache-dir target/bench-cache --no-cpu-quota --arrivals steady --repeat 20 --loads 1.5,1.8 --duration-s 10 --policies budget,local-only --out $(BENCH_OUT)/offload-steady.json $(PHOTOS)
	$(ISOMESH) bench mesh --module $(MODULE) --cache-dir target/bench-cache --out $(BENCH_OUT)/mesh.json $(MESH_PHOTOS)
	$(MAKE) report BENCH_OUT=$(BENCH_OUT) REPORT_DIR=docs

## Builds of the module `make bench` times beside the shipped one (`bench infer --variant`):
## relaxed-simd, tract's fused multiply-add kernels (`f32x4.relaxed_madd`), which an engine
## without relaxed SIMD cannot load. Its own target directory: other RUSTFLAGS rebuild tract.
MODULE_RELAXED := target/variants/relaxed-simd/wasm32-wasip1/release/isomesh_guest.wasm
module-variants: setup
	CARGO_TARGET_DIR=target/variants/relaxed-simd RUSTFLAGS="-C target-feature=+simd128,+relaxed-simd" $(CARGO) build --release -p isomesh-guest --target wasm32-wasip1

## Every benchmark in seconds, to keep them working (CI runs it after `make test`): the same
## commands with tiny counts, the report in target/bench-quick/ (never docs/' figures).
Q := target/bench-quick
bench-quick: module build images bench-python
	mkdir -p target/bench-cache
	$(ISOMESH) bench infer --module $(MODULE) --cache-dir target/bench-cache --onnxruntime $(ONNX) --iterations 1 --out $(Q)/infer.json $(PHOTOS)
	$(ISOMESH) bench infer --module $(MODULE) --cache-dir target/bench-cache --iterations 1 --cpu-cores 0.5 --out $(Q)/infer-edge.json $(PHOTOS)
	$(ISOMESH) bench swap --nodes 2 --before-s 2 --from $(MODULE) --to $(MODULE_V2) --out $(Q)/swap.json $(PHOTOS)
	$(ISOMESH) bench swap --nodes 2 --before-s 2 --from $(MODULE) --to $(MODULE) --model $(ONNX) --labels $(LABELS) --out $(Q)/swap-model.json $(PHOTOS)
	python3 scripts/bench_container.py --quick --isomesh $(ISOMESH) --out $(Q)/container.json
	$(ISOMESH) bench offload --module $(MODULE) --cache-dir target/bench-cache --policies budget --loads 1 --duration-s 3 --out $(Q)/offload.json $(PHOTOS)
	$(ISOMESH) bench offload --module $(MODULE) --cache-dir target/bench-cache --no-cpu-quota --arrivals steady --repeat 2 --loads 1.5 --duration-s 2 --policies budget --out $(Q)/offload-steady.json $(PHOTOS)
	$(ISOMESH) bench mesh --module $(MODULE) --cache-dir target/bench-cache --nodes 1,2 --jobs-per-node 4 --latency-jobs 4 --workers 1,2 --out $(Q)/mesh.json $(MESH_PHOTOS)
	$(MAKE) report BENCH_OUT=$(Q) REPORT_DIR=$(Q)

ONNX := models/files/mobilenet_v2_1.0_224_dequant.onnx
LABELS := models/files/imagenet_labels.txt
# The baseline's and the report's Python packages (PyPI), when missing.
bench-python:
	python3 -c 'import onnxruntime, numpy, PIL, matplotlib' 2>/dev/null || python3 -m pip install --quiet onnxruntime numpy pillow matplotlib

## docs/benchmarks.md and its plots from the JSON in $(BENCH_OUT) (plots: matplotlib).
REPORT_DIR ?= docs
report: bench-python
	mkdir -p $(REPORT_DIR)
	python3 scripts/plot_offload.py $(BENCH_OUT)/offload.json $(REPORT_DIR)/offload.png
	python3 scripts/bench_report.py $(BENCH_OUT) $(REPORT_DIR)/benchmarks.md $(REPORT_DIR)

## Fuzz every decoder of network input (fuzz/fuzz_targets/) for FUZZ_SECONDS each, from seeds made
## of real messages (scripts/fuzz_seeds.py). libFuzzer through cargo-fuzz (installed from crates.io
## if missing), without a sanitizer: the project's Rust is stable, and safe Rust needs none for
## what this looks for (panics, overflows with debug assertions, hangs, runaway allocations).
# CI runs it for 10 s a target (`make fuzz FUZZ_SECONDS=10`) to keep the targets building and
# their seeds passing; the long runs are by hand. Two targets at a time (libFuzzer runs on one
# core), each with its log in target/fuzz-logs/, printed when it fails.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := job manifest chunks image guest_outcome relayed_result rollout_agent version_order broker_files offload
fuzz: module build fuzz-build
	python3 scripts/fuzz_seeds.py target/fuzz-corpus $(BIN)/isomesh $(MODULE) $(PHOTOS)
	mkdir -p target/fuzz-logs
	cd fuzz && printf '%s\n' $(FUZZ_TARGETS) | xargs -P 2 -I{} sh -c '\
	  if $(CARGO) fuzz run --sanitizer none {} ../target/fuzz-corpus/{} -- \
	      -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
	      >../target/fuzz-logs/{}.log 2>&1; then \
	    echo "fuzz {}: passed, $$(grep -m1 number_of_executed_units ../target/fuzz-logs/{}.log)"; \
	  else \
	    tail -n 60 ../target/fuzz-logs/{}.log; echo "fuzz {}: FAILED (target/fuzz-logs/{}.log)"; exit 255; \
	  fi'

## The fuzz targets, built as `make fuzz` runs them (release, debug assertions, no sanitizer).
fuzz-build:
	command -v cargo-fuzz >/dev/null || $(TOOL_INSTALL) cargo-fuzz
	cd fuzz && $(CARGO) fuzz build --sanitizer none
