# isomesh: the two commands a new user needs are `make demo` and `make test`.
# Everything else here is a step of those two.

CARGO ?= cargo
MODULE := target/wasm32-wasip1/release/isomesh_guest.wasm
MODULE_V2 := target/modules/mobilenet_v2-0.2.0.wasm

.PHONY: demo test setup module build images compose-test unit integration lint bench plots clean-demo fuzz

## Run the whole mesh (embedded broker + device, edge, cloud nodes) on the shared photos.
demo: setup module build
	./scripts/demo.sh

## Unit tests, the integration suite against isomesh-broker and again against Mosquitto, then
## the container fault tests of the compose mesh (real containers, built by `make images`).
# Every cargo command selects the whole workspace so features resolve once and target/ is reused.
test: setup module build images
	ISOMESH_TEST_BROKER=isomesh $(CARGO) test --release --workspace --lib --bins --test integration
	ISOMESH_TEST_BROKER=mosquitto $(CARGO) test --release --workspace --test integration
	$(CARGO) test --release --workspace --test compose -- --nocapture

## The container images of compose.yaml (static musl binaries + module, FROM scratch; no registry).
images: setup module
	./scripts/images.sh

## Only the container fault tests of the compose mesh.
compose-test: module build images
	$(CARGO) test --release --workspace --test compose -- --nocapture

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

build:
	$(CARGO) build --release --workspace --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

## Wasm vs native tract vs onnxruntime inference, call overhead, compile/load times; a rollout
## under load vs a restart (with precompiled code, then with every node compiling); the offload
## policies under Poisson load (needs root for CPU quotas); JSON in bench-out/, plots in docs/.
bench: module build
	python3 -c 'import onnxruntime, numpy, PIL' 2>/dev/null || python3 -m pip install --quiet onnxruntime numpy pillow
	./target/release/isomesh bench infer --module $(MODULE) --onnxruntime models/files/mobilenet_v2_1.0_224_dequant.onnx --out bench-out/infer.json ../shared/images/*.jp*g
	./target/release/isomesh bench swap --before-s 20 --from $(MODULE) --to $(MODULE_V2) --out bench-out/swap.json ../shared/images/*.jp*g
	./target/release/isomesh bench swap --before-s 20 --no-precompile --from $(MODULE) --to $(MODULE_V2) --out bench-out/swap-compile.json ../shared/images/*.jp*g
	./target/release/isomesh bench offload --module $(MODULE) --out bench-out/offload.json ../shared/images/*.jp*g
	$(MAKE) plots

## Fuzz every decoder of network input (fuzz/fuzz_targets/) for FUZZ_SECONDS each, from seeds made
## of real messages (scripts/fuzz_seeds.py). libFuzzer through cargo-fuzz (installed from crates.io
## if missing), without a sanitizer: the project's Rust is stable, and safe Rust needs none for
## what this looks for (panics, overflows with debug assertions, hangs, runaway allocations).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := job manifest chunks image guest_outcome relayed_result
fuzz: module build
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	python3 scripts/fuzz_seeds.py target/fuzz-corpus target/release/isomesh $(MODULE) ../shared/images/*.jp*g
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  $(CARGO) fuzz run --sanitizer none $$t ../target/fuzz-corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 || exit 1; \
	done

## PNG plots of the benchmark JSON (matplotlib, from PyPI when missing).
plots:
	python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet matplotlib
	mkdir -p docs
	python3 scripts/plot_offload.py bench-out/offload.json docs/offload.png
