// Package ctfgate is the CTF instancer's team gate inside Traefik (a local plugin, run by Yaegi).
//
// One instance of the middleware guards one instance host. It is configured, in that
// instance's own route file, with the host's label and the host's verification key
// (HMAC(gate key, "host|"+label), see celery_app/ingress/tokens.py), never with the key that
// signs tokens for every host. On the hot path (a valid access cookie for this host, no access
// link, none of our bearer tokens) it removes our cookie and passes the request on, with no
// round trip. Everything else (access links, which set the cookie; denials, whose pages the
// API renders; requests carrying what looks like our bearer token, which only the API can
// check) goes to the API's gate exactly as Traefik's forwardAuth would send it.
//
// The access cookie has two names: the plain one over HTTP and the "__Host-" one over HTTPS
// (Secure, Path=/, no Domain). Both are read, and both are removed before the challenge. The
// scheme told to the gate is https when Traefik got TLS, or when the connection comes from a
// front proxy of trustedProxies that says X-Forwarded-Proto: https; nobody else's is believed.
package ctfgate

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Config is the middleware's configuration (one per instance host).
type Config struct {
	Label          string   `json:"label,omitempty"`
	Key            string   `json:"key,omitempty"`
	Cookie         string   `json:"cookie,omitempty"`
	SecureCookie   string   `json:"secureCookie,omitempty"`
	LinkPrefix     string   `json:"linkPrefix,omitempty"`
	Gate           string   `json:"gate,omitempty"`
	TrustedProxies []string `json:"trustedProxies,omitempty"`
}

// CreateConfig returns the default configuration.
func CreateConfig() *Config {
	return &Config{Cookie: "ctf_ingress_access", SecureCookie: "__Host-ctf_ingress_access",
		LinkPrefix: "/_ctf/access/"}
}

// maxGateBody bounds what is read of the API gate's answer (its pages are small).
const maxGateBody = 65536

// One transport for every host: the API's gate is one address, its connections are reused.
// A bare RoundTrip follows no redirect: the gate's answer to an access link is one, for the
// player. (An http.Client with a CheckRedirect func would do the same, but Yaegi mis-returns
// from interpreted funcs that native code calls.)
var gateTransport = &http.Transport{MaxIdleConnsPerHost: 16, IdleConnTimeout: 90 * time.Second}

const gateTimeout = 30 * time.Second

// Headers the API's gate answers with what the challenge gets (absent: removed).
var rewrites = []string{"Cookie", "Authorization"}

// Not copied from the gate's answer to the player.
var hopHeaders = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Te": true, "Trailer": true, "Transfer-Encoding": true,
	"Upgrade": true, "Content-Length": true,
}

type teamGate struct {
	mu sync.Mutex
	// Cookie values already checked, with their expiry: a browser sends the same one again
	// and again, and in Yaegi the HMAC's library calls cost more than the lookup.
	seen         map[string]int64
	next         http.Handler
	label        string
	key          []byte
	cookie       string
	secureCookie string
	linkPrefix   string
	gate         string
	trusted      []*net.IPNet
}

// New returns the middleware of one instance host.
func New(_ context.Context, next http.Handler, config *Config, _ string) (http.Handler, error) {
	key, err := base64.RawURLEncoding.DecodeString(config.Key)
	if err != nil || len(key) < 32 {
		return nil, errors.New("ctfgate: key must be 32 bytes or more, base64url without padding")
	}
	if config.Label == "" || config.Gate == "" || config.Cookie == "" ||
		config.SecureCookie == "" || config.LinkPrefix == "" {
		return nil, errors.New("ctfgate: label, gate, cookie, secureCookie and linkPrefix are required")
	}
	var trusted []*net.IPNet
	for _, cidr := range config.TrustedProxies {
		_, network, parseErr := net.ParseCIDR(cidr)
		if parseErr != nil {
			return nil, errors.New("ctfgate: trustedProxies must be CIDRs, got " + cidr)
		}
		trusted = append(trusted, network)
	}
	return &teamGate{seen: map[string]int64{}, next: next, label: config.Label, key: key,
		cookie: config.Cookie, secureCookie: config.SecureCookie, linkPrefix: config.LinkPrefix,
		gate: config.Gate, trusted: trusted}, nil
}

// scheme returns https when Traefik got TLS, or when a trusted front proxy says so.
func (g *teamGate) scheme(req *http.Request) string {
	if req.TLS != nil {
		return "https"
	}
	if len(g.trusted) == 0 || req.Header.Get("X-Forwarded-Proto") != "https" {
		return "http"
	}
	host, _, splitErr := net.SplitHostPort(req.RemoteAddr)
	if splitErr != nil {
		host = req.RemoteAddr
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return "http"
	}
	for _, network := range g.trusted {
		if network.Contains(ip) {
			return "https"
		}
	}
	return "http"
}

func (g *teamGate) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	if !strings.HasPrefix(req.URL.RequestURI(), g.linkPrefix) && !g.carriesOurToken(req) {
		if others, ok := g.admit(req.Header["Cookie"]); ok {
			if others == "" {
				req.Header.Del("Cookie")
			} else {
				req.Header.Set("Cookie", others)
			}
			g.next.ServeHTTP(rw, req)
			return
		}
	}
	g.ask(rw, req)
}

func (g *teamGate) sign(kind, principal, expiry string) string {
	mac := hmac.New(sha256.New, g.key)
	mac.Write([]byte(kind + "|" + g.label + "|" + principal + "|" + expiry))
	return base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

// maxSeen bounds the checked-cookie memory of one host (a few players' browsers).
const maxSeen = 256

// valid says whether an access cookie's value is signed for this host and not expired.
func (g *teamGate) valid(token string) bool {
	now := time.Now().Unix()
	g.mu.Lock()
	expiry, known := g.seen[token]
	g.mu.Unlock()
	if known {
		return expiry >= now
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return false
	}
	expiry, err := strconv.ParseInt(parts[1], 10, 64)
	if err != nil || expiry < now {
		return false
	}
	if !hmac.Equal([]byte(g.sign("cookie", parts[0], parts[1])), []byte(parts[2])) {
		return false
	}
	g.mu.Lock()
	if len(g.seen) >= maxSeen {
		g.seen = map[string]int64{}
	}
	g.seen[token] = expiry
	g.mu.Unlock()
	return true
}

const cookieSpace = " \t\r\n\v\f"

// admit returns the Cookie header without our cookie, and whether one of ours is valid here.
func (g *teamGate) admit(values []string) (string, bool) {
	ok := false
	var others []string
	for _, value := range values {
		for _, part := range strings.Split(value, ";") {
			pair := strings.Trim(part, cookieSpace)
			if pair == "" {
				continue
			}
			name, cookie, _ := strings.Cut(pair, "=")
			name = strings.Trim(name, cookieSpace)
			if name != g.cookie && name != g.secureCookie {
				others = append(others, pair)
				continue
			}
			if !ok && g.valid(strings.Trim(strings.Trim(cookie, cookieSpace), "\"")) {
				ok = true
			}
		}
	}
	return strings.Join(others, "; "), ok
}

// carriesOurToken says whether an Authorization header may hold one of our bearer tokens
// (team tokens are <team id>.<64 hex digits>, the admin token any 32 characters or more).
// Only the API can check them, so every bearer token goes to it, except a JWT (three
// base64url parts, the first a JSON object: "eyJ…"), which none of ours is: Juice Shop's API
// calls, the bulk of a challenge's authorised requests, stay on the fast path, untouched.
func (g *teamGate) carriesOurToken(req *http.Request) bool {
	for _, value := range req.Header["Authorization"] {
		scheme, token, _ := strings.Cut(value, " ")
		token = strings.TrimSpace(token)
		if strings.EqualFold(scheme, "bearer") && token != "" && !jwtShaped(token) {
			return true
		}
	}
	return false
}

func jwtShaped(token string) bool {
	if !strings.HasPrefix(token, "eyJ") || strings.Count(token, ".") != 2 {
		return false
	}
	for _, c := range token {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// ask sends the request's gate-relevant headers to the API's gate, as forwardAuth does, and
// either goes on (2xx, with the rewritten Cookie and Authorization) or answers as the gate did.
func (g *teamGate) ask(rw http.ResponseWriter, req *http.Request) {
	ctx, cancel := context.WithTimeout(req.Context(), gateTimeout)
	defer cancel()
	question, buildErr := http.NewRequestWithContext(ctx, http.MethodGet, g.gate, nil)
	if buildErr != nil {
		http.Error(rw, "team gate misconfigured", http.StatusInternalServerError)
		return
	}
	proto := g.scheme(req)
	question.Header.Set("X-Forwarded-Host", req.Host)
	question.Header.Set("X-Forwarded-Uri", req.URL.RequestURI())
	question.Header.Set("X-Forwarded-Proto", proto)
	question.Header.Set("X-Forwarded-Method", req.Method)
	for _, name := range rewrites {
		if values, ok := req.Header[name]; ok {
			question.Header[name] = append([]string(nil), values...)
		}
	}
	answer, askErr := gateTransport.RoundTrip(question)
	if askErr != nil {
		http.Error(rw, "the team gate (the instancer's API) is not answering",
			http.StatusServiceUnavailable)
		return
	}
	defer answer.Body.Close()
	body, readErr := io.ReadAll(io.LimitReader(answer.Body, maxGateBody))
	if readErr != nil {
		http.Error(rw, "the team gate's answer was cut off", http.StatusBadGateway)
		return
	}
	if answer.StatusCode >= 200 && answer.StatusCode < 300 {
		for _, name := range rewrites {
			req.Header.Del(name)
			if values := answer.Header[name]; len(values) > 0 {
				req.Header[name] = append([]string(nil), values...)
			}
		}
		g.next.ServeHTTP(rw, req)
		return
	}
	for name, values := range answer.Header {
		if !hopHeaders[name] {
			rw.Header()[name] = append([]string(nil), values...)
		}
	}
	rw.Header().Set("Content-Length", strconv.Itoa(len(body)))
	rw.WriteHeader(answer.StatusCode)
	_, _ = rw.Write(body)
}
