package main

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"k8s.io/klog/v2"
)

func (pr *podRun) setWaiting(name, reason, msg string) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	pr.statuses[name].State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason, Message: msg}}
}

func (pr *podRun) setRunning(name string, pid int, started metav1.Time, init bool) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	st := pr.statuses[name]
	st.State = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: started}}
	st.ContainerID = fmt.Sprintf("quantops-test://%d", pid)
	st.ImageID = st.Image
	st.Started = boolPtr(true)
	st.Ready = !init // no probes: a running container is ready
	if !init {
		pr.phase = corev1.PodRunning
	}
}

func (pr *podRun) setTerminated(name string, code int32, reason, msg string, at metav1.Time) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	pr.statuses[name].State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
		ExitCode: code, Reason: reason, Message: msg, StartedAt: at, FinishedAt: at}}
}

// fail puts the pod in phase Failed with a reason, so a Job does not wait
// forever on something the test node cannot do.
func (pr *podRun) fail(ctx context.Context, reason, msg string) {
	pr.mu.Lock()
	pr.phase, pr.reason, pr.msg = corev1.PodFailed, reason, msg
	pr.mu.Unlock()
	pr.push(ctx)
}

// finish sets the terminal phase from the containers' exit codes.
func (pr *podRun) finish(ctx context.Context) {
	pr.mu.Lock()
	phase := corev1.PodSucceeded
	for _, c := range append(append([]corev1.Container{}, pr.pod.Spec.InitContainers...), pr.pod.Spec.Containers...) {
		t := pr.statuses[c.Name].State.Terminated
		if t == nil || t.ExitCode != 0 {
			phase = corev1.PodFailed
		}
	}
	pr.phase = phase
	pr.mu.Unlock()
	pr.push(ctx)
}

func condition(t corev1.PodConditionType, ok bool, reason string) corev1.PodCondition {
	s := corev1.ConditionFalse
	if ok {
		s = corev1.ConditionTrue
	}
	return corev1.PodCondition{Type: t, Status: s, Reason: reason, LastTransitionTime: metav1.Now()}
}

// status renders the kubelet-style pod status from the agent's state.
func (pr *podRun) status(base corev1.PodStatus) corev1.PodStatus {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	s := base
	s.Phase, s.Reason, s.Message = pr.phase, pr.reason, pr.msg
	s.HostIP, s.PodIP = "127.0.0.1", "127.0.0.1"
	s.HostIPs = []corev1.HostIP{{IP: "127.0.0.1"}}
	s.PodIPs = []corev1.PodIP{{IP: "127.0.0.1"}}
	s.StartTime = &pr.startTime
	s.InitContainerStatuses, s.ContainerStatuses = nil, nil
	for _, c := range pr.pod.Spec.InitContainers {
		s.InitContainerStatuses = append(s.InitContainerStatuses, *pr.statuses[c.Name].DeepCopy())
	}
	allReady := len(pr.pod.Spec.Containers) > 0
	for _, c := range pr.pod.Spec.Containers {
		st := pr.statuses[c.Name]
		allReady = allReady && st.Ready
		s.ContainerStatuses = append(s.ContainerStatuses, *st.DeepCopy())
	}
	terminal := pr.phase == corev1.PodSucceeded || pr.phase == corev1.PodFailed
	readyReason := ""
	if terminal {
		allReady, readyReason = false, "PodCompleted"
	} else if !allReady {
		readyReason = "ContainersNotReady"
	}
	conds := []corev1.PodCondition{
		condition(corev1.PodReadyToStartContainers, !terminal, ""),
		condition(corev1.PodInitialized, pr.initDone || len(pr.pod.Spec.InitContainers) == 0, ""),
		condition(corev1.ContainersReady, allReady, readyReason),
		condition(corev1.PodReady, allReady, readyReason),
		condition(corev1.PodScheduled, true, ""),
	}
	// Keep the transition time of conditions whose status did not change,
	// and conditions set by others (e.g. the Job controller's).
	old := map[corev1.PodConditionType]corev1.PodCondition{}
	for _, c := range base.Conditions {
		old[c.Type] = c
	}
	mine := map[corev1.PodConditionType]bool{}
	for i := range conds {
		mine[conds[i].Type] = true
		if o, ok := old[conds[i].Type]; ok && o.Status == conds[i].Status {
			conds[i].LastTransitionTime = o.LastTransitionTime
		}
	}
	for _, c := range base.Conditions {
		if !mine[c.Type] {
			conds = append(conds, c)
		}
	}
	s.Conditions = conds
	return s
}

// push writes the status to the API server, retrying on conflicts.
func (pr *podRun) push(ctx context.Context) {
	pr.pushMu.Lock()
	defer pr.pushMu.Unlock()
	pods := pr.a.cs.CoreV1().Pods(pr.pod.Namespace)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := pods.Get(ctx, pr.pod.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if cur.UID != pr.pod.UID {
			return nil
		}
		cur.Status = pr.status(cur.Status)
		_, err = pods.UpdateStatus(ctx, cur, metav1.UpdateOptions{})
		return err
	})
	if err != nil && !apierrors.IsNotFound(err) {
		klog.Errorf("updating status of pod %s/%s: %v", pr.pod.Namespace, pr.pod.Name, err)
	}
}
