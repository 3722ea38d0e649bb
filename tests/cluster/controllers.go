package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	schedapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
	scheduleroptions "k8s.io/kubernetes/cmd/kube-scheduler/app/options"
)

// componentFlags are the flags the controller manager and the scheduler
// share: the admin kubeconfig for API access and for delegated authentication
// and authorization, a loopback secure port with its own certificate
// directory, no leader election (one instance each), and client rate limits
// well above the defaults (20 and 50 requests/s), so that benchmarks with
// thousands of Jobs measure the operator rather than the components' throttles.
func componentFlags(c *cluster, name string, port int) []string {
	return []string{
		"--kube-api-qps=300",
		"--kube-api-burst=600",
		"--kubeconfig=" + c.kubeconfig,
		"--authentication-kubeconfig=" + c.kubeconfig,
		"--authorization-kubeconfig=" + c.kubeconfig,
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + filepath.Join(c.dir, name),
		"--leader-elect=false",
	}
}

// controllerManagerCommand prepares the upstream kube-controller-manager with
// every default controller (job, namespace, garbage collector, service-account
// and token controllers among them). It must be built before the API server's
// command: building it changes a feature-gate default, which panics once
// another component has added the gates to its flags.
func controllerManagerCommand(c *cluster) *cobra.Command {
	args := append(componentFlags(c, "controller-manager", c.kcmPort),
		"--controllers=*",
		"--concurrent-job-syncs=20",
		"--service-account-private-key-file="+c.pki.SAKey,
		"--root-ca-file="+c.pki.CACert,
		"--cluster-signing-cert-file="+c.pki.CACert,
		"--cluster-signing-key-file="+c.pki.CAKey,
		"--service-cluster-ip-range="+serviceCIDR,
		"--v=0",
	)
	cmd := kcmapp.NewControllerManagerCommand()
	cmd.SetArgs(args)
	return cmd
}

// runCommand runs a prepared component command until it stops.
func runCommand(name string, cmd *cobra.Command) error {
	if err := cmd.Execute(); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// schedulerOptions parses the upstream scheduler's flags. The scheduler does
// not go through NewSchedulerCommand because that installs a second process
// signal handler, which panics (the API server owns the first).
func schedulerOptions(c *cluster) (*scheduleroptions.Options, error) {
	opts := scheduleroptions.NewOptions()
	fs := pflag.NewFlagSet("kube-scheduler", pflag.ContinueOnError)
	for _, f := range opts.Flags.FlagSets {
		fs.AddFlagSet(f)
	}
	args := componentFlags(c, "scheduler", c.schedPort)
	if err := fs.Parse(args); err != nil {
		return nil, fmt.Errorf("kube-scheduler flags: %w", err)
	}
	return opts, nil
}

// runScheduler runs the scheduler until ctx ends.
func runScheduler(ctx context.Context, opts *scheduleroptions.Options) error {
	if err := opts.ComponentGlobalsRegistry.Set(); err != nil {
		return fmt.Errorf("kube-scheduler feature gates: %w", err)
	}
	cc, sched, err := schedapp.Setup(ctx, opts)
	if err != nil {
		return fmt.Errorf("kube-scheduler setup: %w", err)
	}
	if err := schedapp.Run(ctx, cc, sched); err != nil {
		return fmt.Errorf("kube-scheduler: %w", err)
	}
	return nil
}
