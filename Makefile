# imdsguard. `sudo make demo` and `sudo make test` are the two commands that matter;
# both install what they need (Debian packages via apt-get, Go tools via go.mod).

GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
GOFLAGS_BUILD := -trimpath -ldflags '$(LDFLAGS)'
# Privileged tests (BPF, namespaces, cgroups) run only when this is set; see
# docs/install-and-operate.md.
PRIV     := IMDSGUARD_PRIVILEGED=1
# Commands the test bed runs, and the Debian packages that provide them. An absolute path
# is checked as a file: the real IMDS clients (test/e2e/real_clients_test.go) are Debian's,
# whatever else PATH finds (a pyenv python3 has no boto3).
TEST_DEPS := curl:curl ip:iproute2 nsenter:util-linux unshare:util-linux bpftool:bpftool \
	setpriv:util-linux strace:strace systemd-analyze:systemd debootstrap:debootstrap systemd-nspawn:systemd-container \
	rpm:rpm dpkg-deb:dpkg /usr/bin/python3:python3 /usr/bin/aws:awscli \
	/usr/lib/python3/dist-packages/boto3:python3-boto3 /usr/bin/cloud-init:cloud-init \
	/usr/bin/node:nodejs /usr/bin/npm:npm pg_ctlcluster:postgresql runc:runc cc:gcc nft:nftables
# Packages: every architecture and format, into $(DIST). See packaging/.
DIST       ?= dist
PKG_ARCHES ?= amd64 arm64
PKG_FORMATS ?= deb rpm
PKG_VERSION ?= $(shell packaging/version.sh)

.PHONY: all build test unit lint demo bench generate check-generate deps build-deps root clean package

all: build

build:
	$(GO) build $(GOFLAGS_BUILD) -o bin/imdsguard ./cmd/imdsguard
	$(GO) build $(GOFLAGS_BUILD) -o bin/imdsguard-correlator ./cmd/imdsguard-correlator

# Unit tests only: no root needed, privileged tests skip and say why.
unit:
	$(GO) test ./...

# Linters (.golangci.yml), pinned in go.mod as a Go tool: no install by hand.
lint:
	$(GO) vet ./...
	$(GO) tool golangci-lint run --allow-parallel-runners ./...

# Everything, as CI runs it: lint, then every test; privileged tests run serially (they
# share the kernel).
test: root deps lint
	$(PRIV) $(GO) test -count=1 -p 1 -parallel 1 -timeout 20m ./...

demo: root deps
	$(GO) run ./tools/demo

bench: root deps
	$(GO) test -run '^$$' -bench Broker -benchtime 20000x ./internal/agent/broker
	$(GO) test -run '^$$' -bench Append -benchtime 2000x ./internal/agent/spool
	$(PRIV) $(GO) test -run '^$$' -bench Load -benchtime 5x ./internal/agent/hook
	$(PRIV) $(GO) test -run '^$$' -bench NetnsEndpoint -benchtime 50x ./internal/agent/netns
	$(PRIV) $(GO) test -run '^$$' -bench Netns100Served -benchtime 1x ./internal/agent/netns
	$(GO) test -run '^$$' -bench 'DecodeRealShaped|ReadPublicTrail' -benchtime 5x ./internal/correlator/cloudtrail
	$(GO) run ./tools/bench
	$(GO) run ./tools/bench-correlator
	$(GO) run ./tools/bench-intake
	$(GO) run ./tools/bench-replicas

# deb and rpm of the agent and of the correlator
# for each of PKG_ARCHES, versioned by packaging/version.sh. Reproducible: static
# binaries built with -trimpath, every mtime set to the last commit's time.
package:
	@set -e; version=$(PKG_VERSION); epoch=$$(git log -1 --format=%ct); \
	for arch in $(PKG_ARCHES); do \
		for cmd in imdsguard imdsguard-correlator; do \
			CGO_ENABLED=0 GOOS=linux GOARCH=$$arch $(GO) build -trimpath \
				-ldflags "-s -w -X main.version=$$version" -o $(DIST)/bin/linux-$$arch/$$cmd ./cmd/$$cmd; \
			for fmt in $(PKG_FORMATS); do \
				VERSION=$$version PKG_ARCH=$$arch DIST=$(DIST) SOURCE_DATE_EPOCH=$$epoch \
					$(GO) tool nfpm package --config packaging/$$cmd.nfpm.yaml --packager $$fmt --target $(DIST)/; \
			done; \
		done; \
	done

# Regenerate the BPF objects and their Go bindings (needs clang; installed if missing).
generate: build-deps
	$(GO) generate ./internal/agent/hook/

# Fails when the committed bpf2go output does not match bpf/.
check-generate: generate
	git diff --exit-code -- internal/agent/hook/

root:
	@if [ "$$(id -u)" != 0 ]; then echo "this target needs root (BPF, namespaces, cgroups): run it with sudo" >&2; exit 1; fi

deps:
	@missing=""; for d in $(TEST_DEPS); do cmd=$${d%%:*}; pkg=$${d##*:}; \
		case $$cmd in /*) [ -e $$cmd ];; *) command -v $$cmd >/dev/null 2>&1;; esac || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build-deps:
	@if ! command -v clang >/dev/null 2>&1 || [ ! -f /usr/include/bpf/bpf_helpers.h ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang llvm libbpf-dev bpftool; \
	fi

clean:
	rm -rf bin dist
