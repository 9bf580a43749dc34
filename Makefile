# The two commands: `make run` starts the local cluster, `make test` runs every test.
CARGO ?= cargo

.PHONY: run test build release lint fmt clean

## Start the local cluster: message service on :50051, gateways on :8080 and :8081.
run:
	@./deploy/run-local.sh

## Build the binaries the end-to-end tests start, then run the whole suite.
test:
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --workspace --bins

## Formatting and clippy, as CI checks them.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
