package intake

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/wire"
)

func BenchmarkPut100(b *testing.B) {
	store, err := OpenSQLite(filepath.Join(b.TempDir(), "fp.db"), zerolog.Nop())
	if err != nil {
		b.Fatal(err)
	}
	defer store.Close()
	n := 0
	for b.Loop() {
		fps := make([]wire.Fingerprint, 100)
		for i := range fps {
			n++
			fps[i] = fp(fmt.Sprintf("id%d", n), instance, account)
		}
		if _, _, err := store.Put(context.Background(), fps, "x"); err != nil {
			b.Fatal(err)
		}
	}
}
