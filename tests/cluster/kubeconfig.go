package main

import (
	"fmt"
	"os"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// writeKubeconfig writes the admin kubeconfig (client certificate in
// system:masters) that the components in this process, kubectl and the tests use.
func writeKubeconfig(c *cluster) error {
	ca, err := os.ReadFile(c.pki.CACert)
	if err != nil {
		return fmt.Errorf("reading CA: %w", err)
	}
	cert, err := os.ReadFile(c.pki.AdminCert)
	if err != nil {
		return fmt.Errorf("reading admin certificate: %w", err)
	}
	key, err := os.ReadFile(c.pki.AdminKey)
	if err != nil {
		return fmt.Errorf("reading admin key: %w", err)
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["quantops-test"] = &clientcmdapi.Cluster{
		Server:                   fmt.Sprintf("https://127.0.0.1:%d", c.apiPort),
		CertificateAuthorityData: ca,
	}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: cert, ClientKeyData: key}
	cfg.Contexts["quantops-test"] = &clientcmdapi.Context{Cluster: "quantops-test", AuthInfo: "admin", Namespace: "default"}
	cfg.CurrentContext = "quantops-test"
	if err := clientcmd.WriteToFile(*cfg, c.kubeconfig); err != nil {
		return fmt.Errorf("writing %s: %w", c.kubeconfig, err)
	}
	return nil
}
