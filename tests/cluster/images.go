package main

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
)

// passthrough is the table value for images whose command runs as given
// (resolved through PATH), e.g. `busybox:*=shell`.
const passthrough = "shell"

type imageRule struct{ pattern, target string }

// imageTable maps image references to local executables; there are no image
// pulls on the test node.
type imageTable struct {
	file  string
	rules []imageRule
}

// defaultRules apply after the file's rules.
var defaultRules = []imageRule{{"shell", passthrough}, {"busybox*", passthrough}}

func loadImageTable(path string) (imageTable, error) {
	t := imageTable{file: path}
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		t.rules = defaultRules
		return t, nil
	}
	if err != nil {
		return t, fmt.Errorf("opening image table: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		pattern, target, ok := strings.Cut(line, "=")
		if !ok {
			return t, fmt.Errorf("%s:%d: want pattern=command, got %q", path, n, line)
		}
		t.rules = append(t.rules, imageRule{strings.TrimSpace(pattern), strings.TrimSpace(target)})
	}
	if err := sc.Err(); err != nil {
		return t, fmt.Errorf("reading image table: %w", err)
	}
	t.rules = append(t.rules, defaultRules...)
	return t, nil
}

// resolve returns the executable for an image, passthrough, or false.
// A pattern ending in `*` matches by prefix; otherwise it must be equal.
func (t imageTable) resolve(image string) (string, bool) {
	for _, r := range t.rules {
		if p, ok := strings.CutSuffix(r.pattern, "*"); ok {
			if strings.HasPrefix(image, p) {
				return r.target, true
			}
		} else if image == r.pattern {
			return r.target, true
		}
	}
	return "", false
}

// argv builds the process argument vector. For a mapped binary, the
// container's command[0] stands for the image's entrypoint and is replaced by
// the binary; for passthrough images command+args run as given.
func argv(target string, command, args []string) ([]string, error) {
	if target == passthrough {
		out := append(append([]string{}, command...), args...)
		if len(out) == 0 {
			return nil, fmt.Errorf("image runs commands as given but the container has no command")
		}
		return out, nil
	}
	out := []string{target}
	if len(command) > 1 {
		out = append(out, command[1:]...)
	}
	return append(out, args...), nil
}
