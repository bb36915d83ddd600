package config

import (
	"strings"
	"testing"
)

func TestRedactURL(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"postgres://root:s3cretpw@db:5432/q", "postgres://root:xxxxx@db:5432/q"},
		{"postgres://root@db/q?sslmode=disable&password=s3cretpw", "postgres://root@db/q?password=xxxxx&sslmode=disable"},
		{"postgres://u:p1@db/q?sslpassword=p2&PGPASSWORD=p3&api_token=p4&x=1", "postgres://u:xxxxx@db/q?PGPASSWORD=xxxxx&api_token=xxxxx&sslpassword=xxxxx&x=1"},
		{"sqlite://.tessera/queue.db", "sqlite://.tessera/queue.db"},
		{"postgres://root@db/q", "postgres://root@db/q"},
		// Not a URL Go parses: still nothing before the @ and after the ?.
		{"postgres://root:s3c%zzret@db/q?password=s3cret", "postgres://xxxxx@db/q?xxxxx"},
	} {
		got := RedactURL(c.in)
		if got != c.want {
			t.Errorf("RedactURL(%q) = %q, want %q", c.in, got, c.want)
		}
		for _, secret := range []string{"s3c", "p1", "p2", "p3", "p4"} {
			if strings.Contains(got, secret) && !strings.Contains(c.in, secret+"@") {
				t.Errorf("RedactURL(%q) = %q keeps the secret %q", c.in, got, secret)
			}
		}
	}
}
