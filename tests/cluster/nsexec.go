package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
)

// mountSpec is one bind mount inside the container's mount namespace.
type mountSpec struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"readOnly,omitempty"`
	File     bool   `json:"file,omitempty"`
}

// execSpec is what the node agent hands to the nsexec helper.
type execSpec struct {
	Mounts     []mountSpec `json:"mounts"`
	Argv       []string    `json:"argv"`
	WorkingDir string      `json:"workingDir,omitempty"`
}

// nsexec runs as the first process of a container, already in its own mount
// namespace (the agent starts it with CLONE_NEWNS). It makes every mount
// private so nothing leaks back to the host, bind-mounts the volumes and the
// termination-message file at their paths, then replaces itself with the
// container's command.
func nsexec(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: nsexec SPEC.json")
	}
	data, err := os.ReadFile(args[0])
	if err != nil {
		return fmt.Errorf("reading exec spec: %w", err)
	}
	var spec execSpec
	if err := json.Unmarshal(data, &spec); err != nil {
		return fmt.Errorf("parsing exec spec %s: %w", args[0], err)
	}
	if err := syscall.Mount("", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making mounts private: %w", err)
	}
	for _, m := range spec.Mounts {
		if err := bindMount(m); err != nil {
			return err
		}
	}
	if spec.WorkingDir != "" {
		if err := os.MkdirAll(spec.WorkingDir, 0o755); err != nil {
			return fmt.Errorf("creating working dir: %w", err)
		}
		if err := os.Chdir(spec.WorkingDir); err != nil {
			return fmt.Errorf("entering working dir: %w", err)
		}
	}
	path, err := exec.LookPath(spec.Argv[0])
	if err != nil {
		return fmt.Errorf("container command %q: %w", spec.Argv[0], err)
	}
	if err := syscall.Exec(path, spec.Argv, os.Environ()); err != nil {
		return fmt.Errorf("exec %s: %w", path, err)
	}
	return nil
}

// bindMount creates the mount point on the host file system when it is
// missing (an empty file or directory), then binds the source over it.
func bindMount(m mountSpec) error {
	if m.File {
		if err := os.MkdirAll(filepath.Dir(m.Target), 0o755); err != nil {
			return fmt.Errorf("creating parent of %s: %w", m.Target, err)
		}
		if !fileExists(m.Target) {
			f, err := os.OpenFile(m.Target, os.O_CREATE|os.O_WRONLY, 0o644)
			if err != nil {
				return fmt.Errorf("creating mount point %s: %w", m.Target, err)
			}
			f.Close()
		}
	} else if err := os.MkdirAll(m.Target, 0o755); err != nil {
		return fmt.Errorf("creating mount point %s: %w", m.Target, err)
	}
	if err := syscall.Mount(m.Source, m.Target, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		return fmt.Errorf("bind-mounting %s on %s: %w", m.Source, m.Target, err)
	}
	if m.ReadOnly {
		flags := uintptr(syscall.MS_BIND | syscall.MS_REMOUNT | syscall.MS_RDONLY)
		if err := syscall.Mount("", m.Target, "", flags, ""); err != nil {
			return fmt.Errorf("remounting %s read-only: %w", m.Target, err)
		}
	}
	return nil
}
