package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// prepareVolumes gives every pod volume a host directory:
//   - emptyDir, configMap, secret, projected, downwardAPI: a fresh directory
//     under the pod's state directory, filled with the keys as files;
//   - hostPath: the path itself (created when missing);
//   - persistentVolumeClaim: the bound PV's hostPath if it has one, otherwise
//     PVC_ROOT/<claim name>.
func (a *nodeAgent) prepareVolumes(ctx context.Context, pod *corev1.Pod, podDir string) (map[string]string, error) {
	out := map[string]string{}
	for _, v := range pod.Spec.Volumes {
		dir := filepath.Join(podDir, "volumes", v.Name)
		var err error
		switch {
		case v.EmptyDir != nil:
			err = os.MkdirAll(dir, 0o777)
		case v.HostPath != nil:
			dir = v.HostPath.Path
			if !fileExists(dir) {
				err = os.MkdirAll(dir, 0o755)
			}
		case v.PersistentVolumeClaim != nil:
			dir, err = a.pvcPath(ctx, pod.Namespace, v.PersistentVolumeClaim.ClaimName)
		case v.ConfigMap != nil:
			err = a.writeConfigMap(ctx, pod.Namespace, dir, v.ConfigMap.Name, v.ConfigMap.Items, ptr.Deref(v.ConfigMap.Optional, false))
		case v.Secret != nil:
			err = a.writeSecret(ctx, pod.Namespace, dir, v.Secret.SecretName, v.Secret.Items, ptr.Deref(v.Secret.Optional, false))
		case v.DownwardAPI != nil:
			err = writeDownward(pod, dir, v.DownwardAPI.Items)
		case v.Projected != nil:
			err = a.writeProjected(ctx, pod, dir, v.Projected.Sources)
		default:
			err = fmt.Errorf("volume type not supported by the test node")
		}
		if err != nil {
			return nil, fmt.Errorf("volume %q: %w", v.Name, err)
		}
		out[v.Name] = dir
	}
	return out, nil
}

func (a *nodeAgent) pvcPath(ctx context.Context, ns, claim string) (string, error) {
	dir := filepath.Join(a.c.pvcRoot, claim)
	pvc, err := a.cs.CoreV1().PersistentVolumeClaims(ns).Get(ctx, claim, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("reading claim %s/%s: %w", ns, claim, err)
	}
	if pvc.Spec.VolumeName != "" {
		pv, err := a.cs.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
		if err != nil {
			return "", fmt.Errorf("reading volume %s: %w", pvc.Spec.VolumeName, err)
		}
		if pv.Spec.HostPath != nil {
			dir = pv.Spec.HostPath.Path
		}
	}
	if err := os.MkdirAll(dir, 0o777); err != nil {
		return "", fmt.Errorf("creating claim directory: %w", err)
	}
	return dir, nil
}

func (a *nodeAgent) writeConfigMap(ctx context.Context, ns, dir, name string, items []corev1.KeyToPath, optional bool) error {
	cm, err := a.cs.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		if optional {
			return os.MkdirAll(dir, 0o755)
		}
		return fmt.Errorf("reading configmap %s: %w", name, err)
	}
	data := map[string][]byte{}
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		data[k] = v
	}
	return writeKeys(dir, data, items)
}

func (a *nodeAgent) writeSecret(ctx context.Context, ns, dir, name string, items []corev1.KeyToPath, optional bool) error {
	s, err := a.cs.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		if optional {
			return os.MkdirAll(dir, 0o755)
		}
		return fmt.Errorf("reading secret %s: %w", name, err)
	}
	return writeKeys(dir, s.Data, items)
}

func writeDownward(pod *corev1.Pod, dir string, items []corev1.DownwardAPIVolumeFile) error {
	data := map[string][]byte{}
	var sel []corev1.KeyToPath
	for _, it := range items {
		if it.FieldRef == nil {
			continue
		}
		v, err := fieldValue(pod, it.FieldRef.FieldPath)
		if err != nil {
			return err
		}
		data[it.Path] = []byte(v)
		sel = append(sel, corev1.KeyToPath{Key: it.Path, Path: it.Path})
	}
	return writeKeys(dir, data, sel)
}

// writeProjected handles what the ServiceAccount admission plugin injects
// (a bound token, kube-root-ca.crt, the namespace), so in-cluster clients work.
func (a *nodeAgent) writeProjected(ctx context.Context, pod *corev1.Pod, dir string, sources []corev1.VolumeProjection) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	for _, s := range sources {
		var err error
		switch {
		case s.ServiceAccountToken != nil:
			err = a.writeToken(ctx, pod, dir, s.ServiceAccountToken)
		case s.ConfigMap != nil:
			err = a.writeConfigMap(ctx, pod.Namespace, dir, s.ConfigMap.Name, s.ConfigMap.Items, ptr.Deref(s.ConfigMap.Optional, false))
		case s.Secret != nil:
			err = a.writeSecret(ctx, pod.Namespace, dir, s.Secret.Name, s.Secret.Items, ptr.Deref(s.Secret.Optional, false))
		case s.DownwardAPI != nil:
			err = writeDownward(pod, dir, s.DownwardAPI.Items)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (a *nodeAgent) writeToken(ctx context.Context, pod *corev1.Pod, dir string, p *corev1.ServiceAccountTokenProjection) error {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		ExpirationSeconds: p.ExpirationSeconds,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}
	if p.Audience != "" {
		req.Spec.Audiences = []string{p.Audience}
	}
	tok, err := a.cs.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("requesting token for service account %s/%s: %w", pod.Namespace, sa, err)
	}
	return writeKeys(dir, map[string][]byte{p.Path: []byte(tok.Status.Token)}, nil)
}

// writeKeys writes each key as a file (all keys, or only the listed items at
// their paths). Paths may not leave dir.
func writeKeys(dir string, data map[string][]byte, items []corev1.KeyToPath) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	if len(items) == 0 {
		for k := range data {
			items = append(items, corev1.KeyToPath{Key: k, Path: k})
		}
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			continue
		}
		if strings.Contains(it.Path, "..") || filepath.IsAbs(it.Path) {
			return fmt.Errorf("invalid key path %q", it.Path)
		}
		p := filepath.Join(dir, it.Path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", filepath.Dir(p), err)
		}
		mode := os.FileMode(0o644)
		if it.Mode != nil {
			mode = os.FileMode(*it.Mode)
		}
		if err := os.WriteFile(p, v, mode); err != nil {
			return fmt.Errorf("writing %s: %w", p, err)
		}
	}
	return nil
}
