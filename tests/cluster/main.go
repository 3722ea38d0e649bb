package main

import (
	"fmt"

	_ "go.etcd.io/etcd/server/v3/embed"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	kcm "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubectl "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/client-go/kubernetes"
)

func main() {
	fmt.Println(apiserver.NewAPIServerCommand, kcm.NewControllerManagerCommand, scheduler.NewSchedulerCommand, kubectl.NewDefaultKubectlCommand)
}
