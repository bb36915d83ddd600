// Package pgtest gives tests a PostgreSQL queue URL of their own: a fresh
// schema on the test server, dropped when the test ends.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// DefaultURL is the server the PostgreSQL tests use unless
// TESSERA_TEST_POSTGRES names another.
const DefaultURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

// SchemaURL returns a URL whose search_path is a fresh schema, dropped when
// the test ends, or skips the test with a message saying how to enable it
// when no server answers.
func SchemaURL(t testing.TB) string {
	t.Helper()
	base := os.Getenv("TESSERA_TEST_POSTGRES")
	if base == "" {
		base = DefaultURL
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Skipf("PostgreSQL tests need a server: start one at 127.0.0.1:5432 with trust auth and a database \"test\", or set TESSERA_TEST_POSTGRES to a URL (%v)", err)
	}
	b := make([]byte, 6)
	rand.Read(b)
	schema := "tessera_test_" + hex.EncodeToString(b)
	if _, err := conn.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		conn.Close(ctx)
		t.Fatal(err)
	}
	conn.Close(ctx)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if conn, err := pgx.Connect(ctx, base); err == nil {
			conn.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
			conn.Close(ctx)
		}
	})
	sep := "?"
	if strings.Contains(base, "?") {
		sep = "&"
	}
	return base + sep + "search_path=" + schema
}
