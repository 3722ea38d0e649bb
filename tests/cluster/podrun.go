package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
)

// podRun is the agent's record of one pod: its processes and the state it
// reports in the pod status.
type podRun struct {
	a   *nodeAgent
	pod *corev1.Pod
	dir string

	mu          sync.Mutex
	stopping    bool
	deleting    bool // guarded by a.mu
	procs       map[string]*os.Process
	statuses    map[string]*corev1.ContainerStatus
	initDone    bool
	phase       corev1.PodPhase
	reason, msg string
	startTime   metav1.Time
	pushMu      sync.Mutex
	done        chan struct{}
}

func newPodRun(a *nodeAgent, pod *corev1.Pod) *podRun {
	pr := &podRun{
		a: a, pod: pod.DeepCopy(),
		dir:       filepath.Join(a.c.dir, "pods", fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID)),
		procs:     map[string]*os.Process{},
		statuses:  map[string]*corev1.ContainerStatus{},
		phase:     corev1.PodPending,
		startTime: metav1.Now(),
		done:      make(chan struct{}),
	}
	for _, c := range append(append([]corev1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...) {
		pr.statuses[c.Name] = &corev1.ContainerStatus{
			Name: c.Name, Image: c.Image,
			State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}},
		}
	}
	return pr
}

// run drives the pod from Pending to a terminal phase (or forever, for
// restartPolicy Always).
func (pr *podRun) run(ctx context.Context) {
	defer close(pr.done)
	pod := pr.pod
	pr.push(ctx)
	if err := os.MkdirAll(pr.dir, 0o755); err != nil {
		pr.fail(ctx, "PodDirFailed", err.Error())
		return
	}
	targets := map[string]string{}
	for _, c := range append(append([]corev1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...) {
		t, ok := pr.a.c.images.resolve(c.Image)
		if !ok {
			pr.setWaiting(c.Name, "ErrImagePull", fmt.Sprintf("image %q is not in the test node's image table (%s); the test node pulls no images", c.Image, pr.a.c.images.file))
			pr.fail(ctx, "ErrImagePull", fmt.Sprintf("container %s: image %q is not mapped to a local command", c.Name, c.Image))
			return
		}
		targets[c.Name] = t
	}
	var vols map[string]string
	for {
		var err error
		if vols, err = pr.a.prepareVolumes(ctx, pod, pr.dir); err == nil {
			break
		}
		for _, c := range pod.Spec.Containers {
			pr.setWaiting(c.Name, "ContainerCreating", err.Error())
		}
		pr.push(ctx)
		if pr.sleepOrStop(ctx, 2*time.Second) {
			return
		}
	}
	for i := range pod.Spec.InitContainers {
		c := &pod.Spec.InitContainers[i]
		if !pr.runRestarting(ctx, c, targets[c.Name], vols, true) {
			pr.finish(ctx)
			return
		}
	}
	pr.mu.Lock()
	pr.initDone = true
	pr.mu.Unlock()
	var wg sync.WaitGroup
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		wg.Add(1)
		go func() {
			defer wg.Done()
			pr.runRestarting(ctx, c, targets[c.Name], vols, false)
		}()
	}
	wg.Wait()
	pr.finish(ctx)
}

// runRestarting runs one container, restarting it as the pod's
// restartPolicy says. It reports whether the container ended successfully.
func (pr *podRun) runRestarting(ctx context.Context, c *corev1.Container, target string, vols map[string]string, init bool) bool {
	policy := pr.pod.Spec.RestartPolicy
	for {
		code := pr.runOnce(ctx, c, target, vols, init)
		if pr.isStopping() {
			return false
		}
		restart := policy == corev1.RestartPolicyAlways && !init ||
			(policy == corev1.RestartPolicyOnFailure || policy == corev1.RestartPolicyAlways && init) && code != 0
		if !restart {
			return code == 0
		}
		if pr.sleepOrStop(ctx, 2*time.Second) {
			return false
		}
		pr.mu.Lock()
		st := pr.statuses[c.Name]
		st.RestartCount++
		st.LastTerminationState = st.State
		pr.mu.Unlock()
	}
}

// runOnce starts the container process through the nsexec helper in a new
// mount namespace and waits for it; it returns the exit code.
func (pr *podRun) runOnce(ctx context.Context, c *corev1.Container, target string, vols map[string]string, init bool) int {
	fail := func(reason string, err error) int {
		pr.setTerminated(c.Name, 128, reason, err.Error(), metav1.Now())
		pr.push(ctx)
		return 128
	}
	av, err := argv(target, c.Command, c.Args)
	if err != nil {
		return fail("CreateContainerError", err)
	}
	env, err := pr.a.containerEnv(ctx, pr.pod, c)
	if err != nil {
		return fail("CreateContainerConfigError", err)
	}
	termFile := filepath.Join(pr.dir, c.Name+".termination-log")
	if err := os.WriteFile(termFile, nil, 0o666); err != nil {
		return fail("CreateContainerError", err)
	}
	termPath := c.TerminationMessagePath
	if termPath == "" {
		termPath = corev1.TerminationMessagePathDefault
	}
	spec := execSpec{Argv: av, WorkingDir: c.WorkingDir,
		Mounts: []mountSpec{{Source: termFile, Target: termPath, File: true}}}
	for _, m := range c.VolumeMounts {
		src, ok := vols[m.Name]
		if !ok {
			return fail("CreateContainerConfigError", fmt.Errorf("volume mount %q names no pod volume", m.Name))
		}
		src = filepath.Join(src, m.SubPath)
		st, err := os.Stat(src)
		isFile := err == nil && !st.IsDir()
		spec.Mounts = append(spec.Mounts, mountSpec{Source: src, Target: m.MountPath, ReadOnly: m.ReadOnly, File: isFile})
	}
	specFile := filepath.Join(pr.dir, c.Name+".exec.json")
	data, err := json.Marshal(spec)
	if err != nil {
		return fail("CreateContainerError", err)
	}
	if err := os.WriteFile(specFile, data, 0o600); err != nil {
		return fail("CreateContainerError", err)
	}
	logFile, err := os.OpenFile(filepath.Join(pr.dir, c.Name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fail("CreateContainerError", err)
	}
	defer logFile.Close()
	self, err := os.Executable()
	if err != nil {
		return fail("CreateContainerError", err)
	}
	cmd := exec.Command(self, "nsexec", specFile)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Unshareflags: syscall.CLONE_NEWNS}
	pr.mu.Lock()
	if pr.stopping {
		pr.mu.Unlock()
		return 137
	}
	err = cmd.Start()
	if err == nil {
		pr.procs[c.Name] = cmd.Process
	}
	pr.mu.Unlock()
	if err != nil {
		return fail("StartError", err)
	}
	started := metav1.Now()
	klog.Infof("pod %s/%s container %s: pid %d: %s", pr.pod.Namespace, pr.pod.Name, c.Name, cmd.Process.Pid, strings.Join(av, " "))
	pr.setRunning(c.Name, cmd.Process.Pid, started, init)
	pr.push(ctx)

	err = cmd.Wait()
	finished := metav1.Now()
	pr.mu.Lock()
	delete(pr.procs, c.Name)
	pr.mu.Unlock()
	code := exitCode(cmd, err)
	reason := "Completed"
	if code != 0 {
		reason = "Error"
	}
	msg := terminationMessage(termFile, filepath.Join(pr.dir, c.Name+".log"), c.TerminationMessagePolicy, code)
	pr.mu.Lock()
	st := pr.statuses[c.Name]
	st.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
		ExitCode: int32(code), Reason: reason, Message: msg, StartedAt: started, FinishedAt: finished,
		ContainerID: st.ContainerID,
	}}
	st.Ready, st.Started = false, boolPtr(false)
	pr.mu.Unlock()
	pr.push(ctx)
	return code
}

func exitCode(cmd *exec.Cmd, err error) int {
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return 128
	}
	ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return cmd.ProcessState.ExitCode()
}

// terminationMessage reads what the process wrote to its termination path,
// cut at 4096 bytes like the kubelet; with FallbackToLogsOnError it uses the
// log tail when the file is empty and the container failed.
func terminationMessage(termFile, logPath string, policy corev1.TerminationMessagePolicy, code int) string {
	const limit = 4096
	data, err := os.ReadFile(termFile)
	if err != nil {
		return ""
	}
	if len(data) > limit {
		data = data[:limit]
	}
	if len(data) == 0 && code != 0 && policy == corev1.TerminationMessageFallbackToLogsOnError {
		logData, err := os.ReadFile(logPath)
		if err == nil {
			if len(logData) > 2048 {
				logData = logData[len(logData)-2048:]
			}
			data = logData
		}
	}
	return string(data)
}

// stop kills every process group of the pod: SIGTERM, then SIGKILL after grace.
func (pr *podRun) stop(grace time.Duration) {
	pr.mu.Lock()
	pr.stopping = true
	var pids []int
	for _, p := range pr.procs {
		pids = append(pids, p.Pid)
	}
	pr.mu.Unlock()
	for _, pid := range pids {
		_ = syscall.Kill(-pid, syscall.SIGTERM)
	}
	if len(pids) == 0 {
		return
	}
	go func() {
		select {
		case <-pr.done:
		case <-time.After(grace):
			for _, pid := range pids {
				_ = syscall.Kill(-pid, syscall.SIGKILL)
			}
		}
	}()
}

func (pr *podRun) isStopping() bool {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.stopping
}

// sleepOrStop waits d; it reports true when the pod is being stopped.
func (pr *podRun) sleepOrStop(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return true
	case <-time.After(d):
		return pr.isStopping()
	}
}

func boolPtr(b bool) *bool { return &b }
