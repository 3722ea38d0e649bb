// Command testcluster is a single-process Kubernetes control plane (etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler) plus a test node
// agent that runs pods as local processes, for the quantops end-to-end tests.
//
// It is a multi-call binary:
//
//	testcluster run --dir DIR      start everything (what tests/cluster/up runs)
//	testcluster kubectl ARGS...    kubectl (also when invoked through a symlink named kubectl)
//	testcluster nsexec SPEC        internal: enter the container's mounts and exec its command
package main

import (
	"fmt"
	"os"
	"path/filepath"
)

func main() {
	if filepath.Base(os.Args[0]) == "kubectl" {
		os.Exit(runKubectl(os.Args[1:]))
	}
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: testcluster run|kubectl|nsexec ...")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "kubectl":
		os.Exit(runKubectl(os.Args[2:]))
	case "nsexec":
		// Only returns on error: on success the process image is replaced.
		fmt.Fprintf(os.Stderr, "nsexec: %v\n", nsexec(os.Args[2:]))
		os.Exit(127)
	case "run":
		if err := run(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "testcluster: %v\n", err)
			os.Exit(1)
		}
	default:
		fmt.Fprintf(os.Stderr, "testcluster: unknown subcommand %q\n", os.Args[1])
		os.Exit(2)
	}
}
