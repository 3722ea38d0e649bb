package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
)

const (
	serviceCIDR = "10.0.0.0/24"
	// serviceIP is the first address of serviceCIDR, the `kubernetes` Service.
	serviceIP = "10.0.0.1"
	issuer    = "https://kubernetes.default.svc.cluster.local"
)

// apiServerCommand prepares the upstream kube-apiserver command with client
// certificates, Node+RBAC authorization and the service-account token
// machinery.
func apiServerCommand(c *cluster) *cobra.Command {
	p := c.pki
	args := []string{
		"--etcd-servers=http://127.0.0.1:" + strconv.Itoa(c.etcdPort),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(c.apiPort),
		"--cert-dir=" + filepath.Join(c.dir, "apiserver"),
		"--tls-cert-file=" + p.ServingCert,
		"--tls-private-key-file=" + p.ServingKey,
		"--client-ca-file=" + p.CACert,
		// Request-header authentication for the delegated authentication of
		// the controller manager and scheduler (nothing proxies requests here).
		"--requestheader-client-ca-file=" + p.CACert,
		"--requestheader-allowed-names=front-proxy-client",
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--authorization-mode=Node,RBAC",
		"--service-account-key-file=" + p.SAPub,
		"--service-account-signing-key-file=" + p.SAKey,
		"--service-account-issuer=" + issuer,
		"--api-audiences=" + issuer,
		"--service-cluster-ip-range=" + serviceCIDR,
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		// The `kubernetes` Service cannot have loopback endpoints; clients
		// on the test node get KUBERNETES_SERVICE_HOST=127.0.0.1 instead.
		"--endpoint-reconciler-type=none",
		"--v=0",
	}
	cmd := apiserverapp.NewAPIServerCommand()
	cmd.SetArgs(args)
	return cmd
}

// waitReady polls /readyz until the API server reports ready.
func waitReady(ctx context.Context, cs kubernetes.Interface, timeout time.Duration) error {
	var last error
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			last = err
			return false, nil
		}
		return string(body) == "ok", nil
	})
	if err != nil {
		return fmt.Errorf("kube-apiserver not ready after %s (last error: %v): %w", timeout, last, err)
	}
	return nil
}
