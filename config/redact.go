package config

import (
	"net/url"
	"strings"
)

// RedactURL hides the secrets of a URL before it is logged or printed: the
// password of its user information and the values of query parameters
// that hold one (password, sslpassword, and any whose name ends in
// "password", "secret" or "token", in any case). Text that is not a URL
// is returned with nothing after a scheme's "://" but the host, so that a
// malformed URL with a password in it is not printed whole either.
func RedactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		if i := strings.Index(s, "://"); i >= 0 {
			rest := s[i+3:]
			if at := strings.LastIndex(rest, "@"); at >= 0 {
				rest = "xxxxx@" + rest[at+1:]
			}
			if q := strings.IndexAny(rest, "?"); q >= 0 {
				rest = rest[:q] + "?xxxxx"
			}
			return s[:i+3] + rest
		}
		return s
	}
	if u.User != nil {
		if _, ok := u.User.Password(); ok {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
		}
	}
	if u.RawQuery != "" {
		q := u.Query()
		changed := false
		for k := range q {
			l := strings.ToLower(k)
			if strings.HasSuffix(l, "password") || strings.HasSuffix(l, "secret") || strings.HasSuffix(l, "token") {
				q[k] = []string{"xxxxx"}
				changed = true
			}
		}
		if changed {
			u.RawQuery = q.Encode()
		}
	}
	return u.String()
}
