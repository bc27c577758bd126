package testbed

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// BinDir is where the bed builds the programs it runs: bin/ under the module root
// (ignored by git), or $IMDSGUARD_BIN_DIR.
func BinDir() (string, error) {
	if d := os.Getenv("IMDSGUARD_BIN_DIR"); d != "" {
		return d, nil
	}
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("find module root: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("find module root: not inside the imdsguard module")
	}
	return filepath.Join(filepath.Dir(mod), "bin"), nil
}

// Build compiles a package of this module (or a tool it pins in go.mod) into BinDir,
// once per process, and returns the binary's path. go's build cache makes a repeat
// build cheap.
func Build(pkg, name string) (string, error) {
	return build(pkg, name)
}

// build is Build with extra environment for the go command.
func build(pkg, name string, env ...string) (string, error) {
	return compileOnce(pkg, name, func(root, out string) *exec.Cmd {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Dir = root
		if env != nil {
			cmd.Env = append(os.Environ(), env...)
		}
		return cmd
	})
}

// compileOnce runs the command cmd makes (root is the module's directory, out the
// binary to write in BinDir) once per key and process, and returns out.
func compileOnce(key, name string, cmd func(root, out string) *exec.Cmd) (string, error) {
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := built[key]; ok {
		return p, nil
	}
	dir, err := BinDir()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", dir, err)
	}
	out := filepath.Join(dir, name)
	if msg, err := cmd(filepath.Dir(dir), out).CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s: %w: %s", key, err, msg)
	}
	built[key] = out
	return out, nil
}

var built = map[string]string{}

// Emulator builds amazon-ec2-metadata-mock from the version pinned in go.mod.
func Emulator() (string, error) {
	return Build("github.com/aws/amazon-ec2-metadata-mock/cmd/ec2-metadata-mock", "ec2-metadata-mock")
}

// ClientBinary builds the bed's Go IMDS client (aws-sdk-go-v2's feature/ec2/imds).
func ClientBinary() (string, error) {
	return Build("github.com/imdsguard/imdsguard/internal/testing/testbed/imdsclient", "imds-client")
}

// Agent builds the imdsguard agent static (CGO_ENABLED=0), as the packages ship it: what
// tests and benchmarks run, and what they measure, is the binary users get.
func Agent() (string, error) {
	return build("github.com/imdsguard/imdsguard/cmd/imdsguard", "imdsguard", "CGO_ENABLED=0")
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// HostileBinary builds the bed's local attacker (the review's probes: a marked socket,
// a port bound first, a connection from a chosen source).
func HostileBinary() (string, error) {
	return Build("github.com/imdsguard/imdsguard/internal/testing/testbed/hostile", "hostile")
}

// BorrowBinary compiles hostile/borrow/borrow.c, the exe-borrowing probe (a C program:
// it remaps its own file, which a Go runtime's threads would race), with cc.
func BorrowBinary() (string, error) {
	return compileOnce("hostile-borrow", "hostile-borrow", func(root, out string) *exec.Cmd {
		src := filepath.Join(root, "internal", "testing", "testbed", "hostile", "borrow", "borrow.c")
		return exec.Command("cc", "-O2", "-Wall", "-o", out, src)
	})
}
