package main

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

// nodeAgent is a minimal kubelet: it registers one Node, keeps it Ready and
// runs the pods bound to it as local processes.
type nodeAgent struct {
	c  *cluster
	cs kubernetes.Interface

	mu   sync.Mutex
	pods map[types.UID]*podRun
}

func newNodeAgent(c *cluster, cs kubernetes.Interface) *nodeAgent {
	return &nodeAgent{c: c, cs: cs, pods: map[types.UID]*podRun{}}
}

func (a *nodeAgent) nodeStatus() corev1.NodeStatus {
	now := metav1.Now()
	res := corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse("16"),
		corev1.ResourceMemory:           resource.MustParse("128Gi"),
		corev1.ResourcePods:             resource.MustParse("110"),
		corev1.ResourceEphemeralStorage: resource.MustParse("500Gi"),
		"nvidia.com/gpu":                resource.MustParse("8"),
	}
	cond := func(t corev1.NodeConditionType, s corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: s, Reason: reason, Message: msg, LastHeartbeatTime: now, LastTransitionTime: now}
	}
	return corev1.NodeStatus{
		Capacity:    res,
		Allocatable: res,
		Phase:       corev1.NodeRunning,
		Conditions: []corev1.NodeCondition{
			cond(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "quantops test node agent is posting ready status"),
			cond(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", "test node"),
			cond(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", "test node"),
			cond(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", "test node"),
		},
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: "127.0.0.1"},
			{Type: corev1.NodeHostName, Address: a.c.nodeName},
		},
		NodeInfo: corev1.NodeSystemInfo{
			OperatingSystem: runtime.GOOS, Architecture: runtime.GOARCH,
			KubeletVersion: "v1.34.4", ContainerRuntimeVersion: "quantops-test://0",
		},
	}
}

// register creates (or refreshes) the Node with GPU capacity and the labels
// the Helm chart's worker node selector uses.
func (a *nodeAgent) register(ctx context.Context) error {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: a.c.nodeName,
			Labels: map[string]string{
				"kubernetes.io/hostname":  a.c.nodeName,
				"kubernetes.io/os":        runtime.GOOS,
				"kubernetes.io/arch":      runtime.GOARCH,
				"quantops.dev/gpu-node":   "true",
				"nvidia.com/gpu.present":  "true",
				"node.kubernetes.io/role": "quantops-test",
			},
		},
	}
	_, err := a.cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("registering node %s: %w", a.c.nodeName, err)
	}
	return a.updateStatus(ctx)
}

func (a *nodeAgent) updateStatus(ctx context.Context) error {
	n, err := a.cs.CoreV1().Nodes().Get(ctx, a.c.nodeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("reading node %s: %w", a.c.nodeName, err)
	}
	n.Status = a.nodeStatus()
	if _, err := a.cs.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("updating node %s status: %w", a.c.nodeName, err)
	}
	return nil
}

// heartbeat renews the node Lease every 10s and posts the status every 30s,
// so the node lifecycle controller never marks the node unreachable.
func (a *nodeAgent) heartbeat(ctx context.Context) {
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for i := 0; ; i++ {
		if err := a.renewLease(ctx); err != nil {
			klog.Errorf("node lease: %v", err)
		}
		if i%3 == 2 {
			if err := a.updateStatus(ctx); err != nil {
				klog.Errorf("node status: %v", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (a *nodeAgent) renewLease(ctx context.Context) error {
	leases := a.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	l, err := leases.Get(ctx, a.c.nodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		n, err := a.cs.CoreV1().Nodes().Get(ctx, a.c.nodeName, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("reading node for lease owner: %w", err)
		}
		l = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{
				Name:            a.c.nodeName,
				OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: n.Name, UID: n.UID}},
			},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(a.c.nodeName), LeaseDurationSeconds: ptr.To[int32](40), RenewTime: &now},
		}
		if _, err := leases.Create(ctx, l, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating node lease: %w", err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading node lease: %w", err)
	}
	l.Spec.RenewTime = &now
	if _, err := leases.Update(ctx, l, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("renewing node lease: %w", err)
	}
	return nil
}
