package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/klog/v2"
)

// cluster is the shared configuration of the components in this process.
type cluster struct {
	dir        string
	kubeconfig string
	pki        pki
	etcdPort   int
	peerPort   int
	apiPort    int
	kcmPort    int
	schedPort  int
	nodeName   string
	images     imageTable
	pvcRoot    string
}

func run(argv []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	dir := fs.String("dir", os.Getenv("QUANTOPS_TEST_DIR"), "state directory (kubeconfig, pki, etcd data, pod logs)")
	imagesFile := fs.String("images", "", "image table file: lines `pattern=command` (default DIR/images)")
	nodeName := fs.String("node-name", "quantops-test-node", "name of the node this process registers")
	pvcRoot := fs.String("pvc-root", "", "directory under which a PVC named X is mapped to X/ (default DIR/volumes)")
	if err := fs.Parse(argv); err != nil {
		return err
	}
	if *dir == "" {
		return fmt.Errorf("--dir or QUANTOPS_TEST_DIR is required")
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return fmt.Errorf("resolving %s: %w", *dir, err)
	}
	c := &cluster{dir: abs, kubeconfig: filepath.Join(abs, "kubeconfig"), pki: newPKI(filepath.Join(abs, "pki")), nodeName: *nodeName}
	c.pvcRoot = *pvcRoot
	if c.pvcRoot == "" {
		c.pvcRoot = filepath.Join(abs, "volumes")
	}
	if *imagesFile == "" {
		*imagesFile = filepath.Join(abs, "images")
	}
	if c.images, err = loadImageTable(*imagesFile); err != nil {
		return err
	}
	if err := c.pki.ensure(); err != nil {
		return err
	}
	ports, err := freePorts(5)
	if err != nil {
		return err
	}
	c.etcdPort, c.peerPort, c.apiPort, c.kcmPort, c.schedPort = ports[0], ports[1], ports[2], ports[3], ports[4]

	// Each upstream component applies the logging configuration; they all
	// use the same one, so later applications are no-ops instead of errors.
	logsapi.ReapplyHandling = logsapi.ReapplyHandlingIgnoreUnchanged
	// Order matters: see controllerManagerCommand.
	kcmCmd := controllerManagerCommand(c)
	apiCmd := apiServerCommand(c)
	schedOpts, err := schedulerOptions(c)
	if err != nil {
		return err
	}

	start := time.Now()
	etcd, err := startEtcd(filepath.Join(abs, "etcd"), c.etcdPort, c.peerPort)
	if err != nil {
		return err
	}
	defer etcd.Close()
	klog.Infof("etcd ready on 127.0.0.1:%d after %s", c.etcdPort, time.Since(start))

	if err := writeKubeconfig(c); err != nil {
		return err
	}
	fatal := make(chan error, 4)
	go func() { fatal <- runCommand("kube-apiserver", apiCmd) }()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cfg, err := clientcmd.BuildConfigFromFlags("", c.kubeconfig)
	if err != nil {
		return fmt.Errorf("loading %s: %w", c.kubeconfig, err)
	}
	cfg.QPS, cfg.Burst = 100, 200
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("building client: %w", err)
	}
	if err := waitReady(ctx, cs, 120*time.Second); err != nil {
		return err
	}
	klog.Infof("kube-apiserver ready on https://127.0.0.1:%d after %s", c.apiPort, time.Since(start))

	go func() { fatal <- runCommand("kube-controller-manager", kcmCmd) }()
	go func() { fatal <- runScheduler(ctx, schedOpts) }()

	agent := newNodeAgent(c, cs)
	if err := agent.register(ctx); err != nil {
		return err
	}
	go agent.heartbeat(ctx)
	if err := agent.runPods(ctx); err != nil {
		return err
	}
	// The up script waits for this file; writing it last means the API
	// answers and the node is registered Ready.
	if err := os.WriteFile(filepath.Join(abs, "ready"), []byte(time.Now().UTC().Format(time.RFC3339)+"\n"), 0o644); err != nil {
		return fmt.Errorf("writing ready marker: %w", err)
	}
	fmt.Printf("quantops test cluster ready after %s: KUBECONFIG=%s\n", time.Since(start).Round(time.Millisecond), c.kubeconfig)

	select {
	case err := <-fatal:
		return err
	case err := <-etcd.Err():
		return fmt.Errorf("etcd: %w", err)
	}
}

// freePorts asks the kernel for n distinct free loopback ports.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
