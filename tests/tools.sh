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
