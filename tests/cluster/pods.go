package main

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

// runPods watches the pods bound to this node and starts or stops them.
func (a *nodeAgent) runPods(ctx context.Context) error {
	factory := informers.NewSharedInformerFactoryWithOptions(a.cs, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", a.c.nodeName).String()
		}))
	inf := factory.Core().V1().Pods().Informer()
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { a.onPod(ctx, obj) },
		UpdateFunc: func(_, obj any) { a.onPod(ctx, obj) },
		DeleteFunc: func(obj any) {
			if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			if pod, ok := obj.(*corev1.Pod); ok {
				a.forget(pod)
			}
		},
	})
	if err != nil {
		return fmt.Errorf("watching pods: %w", err)
	}
	factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return fmt.Errorf("pod informer did not sync")
	}
	return nil
}

func (a *nodeAgent) onPod(ctx context.Context, obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	a.mu.Lock()
	pr := a.pods[pod.UID]
	if pod.DeletionTimestamp != nil {
		if pr == nil {
			pr = newPodRun(a, pod)
			close(pr.done) // never started: nothing to stop
			a.pods[pod.UID] = pr
		}
		first := !pr.deleting
		pr.deleting = true
		a.mu.Unlock()
		if first {
			go a.stopAndRemove(ctx, pr, pod)
		}
		return
	}
	if pr != nil || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		a.mu.Unlock()
		return
	}
	pr = newPodRun(a, pod)
	a.pods[pod.UID] = pr
	a.mu.Unlock()
	klog.Infof("starting pod %s/%s", pod.Namespace, pod.Name)
	go pr.run(ctx)
}

// stopAndRemove kills the pod's processes (SIGTERM, then SIGKILL after the
// grace period, at most 10s) and finalizes the deletion like a kubelet does.
func (a *nodeAgent) stopAndRemove(ctx context.Context, pr *podRun, pod *corev1.Pod) {
	grace := 10 * time.Second
	if pod.DeletionGracePeriodSeconds != nil && time.Duration(*pod.DeletionGracePeriodSeconds)*time.Second < grace {
		grace = time.Duration(*pod.DeletionGracePeriodSeconds) * time.Second
	}
	pr.stop(grace)
	<-pr.done
	err := a.cs.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To[int64](0),
		Preconditions:      metav1.NewUIDPreconditions(string(pod.UID)),
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		klog.Errorf("finalizing deletion of pod %s/%s: %v", pod.Namespace, pod.Name, err)
		return
	}
	klog.Infof("removed pod %s/%s", pod.Namespace, pod.Name)
}

func (a *nodeAgent) forget(pod *corev1.Pod) {
	a.mu.Lock()
	pr := a.pods[pod.UID]
	delete(a.pods, pod.UID)
	a.mu.Unlock()
	if pr != nil {
		pr.stop(0)
	}
}
