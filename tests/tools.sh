# Installs the toolchains the tests need when the machine lacks them, from the
# package registries only (Debian, crates.io, the Go module proxy).

HELM_VERSION=${HELM_VERSION:-v3.16.4}

# Go >= 1.24 is needed to build the test control plane from k8s.io/kubernetes.
GO_TOOLCHAIN_VERSION=${GO_TOOLCHAIN_VERSION:-1.24.4}

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust (rustup) first" >&2
    return 1
  fi
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
}

go_is_recent() {
  local v
  v=$(go env GOVERSION 2>/dev/null | sed 's/^go//') || return 1
  [[ -n "$v" ]] && printf '%s\n1.24\n' "$v" | sort -V -C -r 2>/dev/null
}

ensure_go() {
  export PATH="$PATH:/usr/local/go/bin"
  if command -v go >/dev/null && go_is_recent; then
    return 0
  fi
  # Debian's golang-go is too old for Kubernetes 1.34, but any Go can fetch
  # the official toolchain as a module from the Go module proxy.
  if ! command -v go >/dev/null; then
    apt-get update -qq && apt-get install -y -qq golang-go >/dev/null
    export PATH="$PATH:/usr/lib/go/bin"
  fi
  local mod="golang.org/toolchain@v0.0.1-go${GO_TOOLCHAIN_VERSION}.linux-amd64"
  local dir
  dir=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "$mod" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
  export PATH="$dir/bin:$PATH" GOTOOLCHAIN=local
  go version
}

# helm lints and renders the chart (charts/check) and the operator's
# end-to-end tests install its RBAC from `helm template`. No registry ships
# a helm binary, so it is built from its Go module (needs ensure_go first).
ensure_helm() {
  export PATH="$PATH:$HOME/go/bin"
  if command -v helm >/dev/null; then
    return 0
  fi
  echo "building helm $HELM_VERSION from its Go module (a cold build takes minutes)..." >&2
  (cd /tmp && GOBIN="$HOME/go/bin" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
  helm version --short
}

# nginx and fcgiwrap (Debian) serve `git http-backend` with basic auth for the
# GitOps tests (tests/gitserver/up), sshd serves the same repositories over
# SSH; openssl hashes the htpasswd entry, ssh-keygen makes the test keys.
ensure_gitserver_tools() {
  local missing=()
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
  command -v fcgiwrap >/dev/null || [[ -x /usr/sbin/fcgiwrap ]] || missing+=(fcgiwrap)
  command -v openssl >/dev/null || missing+=(openssl)
  [[ -x /usr/lib/git-core/git-http-backend ]] || missing+=(git)
  command -v sshd >/dev/null || [[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
  command -v ssh-keygen >/dev/null || missing+=(openssh-client)
  if (( ${#missing[@]} )); then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# NVRTC, so the tests compile the GPU kernels' CUDA C without a GPU or a
# toolkit: the library alone, from NVIDIA's PyPI wheel, cached in $HOME.
# The tests then require it (QUANTOPS_REQUIRE_NVRTC) instead of skipping.
ensure_nvrtc() {
  local dir="$HOME/.cache/quantops/nvrtc-13.0.88"
  if [[ ! -e "$dir/nvidia/cu13/lib/libnvrtc.so.13" ]]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
      apt-get update -qq && apt-get install -y -qq python3 python3-pip >/dev/null
    fi
    local wheels
    wheels=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: \
      --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
      "nvidia-cuda-nvrtc==13.0.88" -d "$wheels"
    mkdir -p "$dir"
    python3 -m zipfile -e "$wheels"/nvidia_cuda_nvrtc-*.whl "$dir"
    rm -rf "$wheels"
  fi
  export LD_LIBRARY_PATH="$dir/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export QUANTOPS_REQUIRE_NVRTC=1
}

# Prometheus and promtool (Debian's `prometheus` package) for the monitoring
# tests: the alert rules are checked and unit-tested with promtool, and the
# e2e tests start a real Prometheus on loopback. The package is unpacked into
# a cache directory with `apt-get download` + `dpkg -x` rather than
# installed, so no distribution service starts on :9090; the tests find it
# through QUANTOPS_PROMETHEUS_BIN.
ensure_prometheus() {
  local dir="$HOME/.cache/quantops/prometheus"
  if [[ ! -x "$dir/usr/bin/prometheus" || ! -x "$dir/usr/bin/promtool" ]]; then
    local debs
    debs=$(mktemp -d)
    if ! (cd "$debs" && apt-get download prometheus >/dev/null 2>&1); then
      apt-get update -qq
      (cd "$debs" && apt-get download prometheus >/dev/null)
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    dpkg -x "$debs"/prometheus_*.deb "$dir"
    rm -rf "$debs"
  fi
  export QUANTOPS_PROMETHEUS_BIN="$dir/usr/bin"
  "$dir/usr/bin/prometheus" --version 2>&1 | head -n 1
}
