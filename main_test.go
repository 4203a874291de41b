package main

// The tests read as a walkthrough of the flow: TestWalkthrough takes one MCP
// client from its first 401 to a tool result, step by step, in the order of
// the README, and TestSSEWalkthrough does the same over HTTP+SSE;
// TestModernWalkthrough and TestCIMDWalkthrough take the shortcuts of MCP
// 2026-07-28 (no initialize) and of metadata documents (no registration).
// Then come each step's failure cases, in step order, as tables; then the lifecycle
// (refresh, revocation, Entra renewal, restarts, start and shutdown);
// hardening; and the fuzz targets and benchmarks. Last are the demo, the test
// environment and its helpers, and the fake Entra ID.
//
// Everything runs in-process on loopback, against fakeEntra: a local Entra ID
// (authorize, token, discovery, JWKS) and Microsoft Graph (/v1.0/me) that is
// as strict as the real ones: single-use codes that expire, exact redirect
// URIs, PKCE, the client secret, and access tokens Graph checks.
//
// go test -run TestDemo -demo serves the real server on localhost:3001
// against this fake, for trying it with real MCP clients (see README).

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"html/template"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"math/big"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/oauth2"
)

// The demo's flags are the only package-level state: go test -run TestDemo
// -demo [-demo-entra-ttl 2m].
var (
	demo         = flag.Bool("demo", false, "serve the server on PUBLIC_URL (default localhost:3001) against a fake Entra ID until interrupted")
	demoEntraTTL = flag.Duration("demo-entra-ttl", time.Hour, "with -demo: the lifetime of the fake Entra ID's access tokens, to watch the server renew them")
)

// ---- The walkthroughs ----

// TestWalkthrough is the whole flow, as in the README: one MCP client, from
// its first 401 to the signed-in user's name from Microsoft Graph.
func TestWalkthrough(t *testing.T) {
	env := newTestEnv(t)
	browser := newBrowser(t)
	var (
		clientID    string
		redirectURI = "http://127.0.0.1:7777/callback"
		verifier    = oauth2.GenerateVerifier()
		state       = "vscode://ms.vscode/did-authenticate?windowId=1&nonce=a%2Fb" // clients' states can be long URIs
		consentID   string
		entraURL    *url.URL
		callbackURL string
		code        string
		tokens      tokenResponse
		c           *mcpClient
	)

	t.Run("step 1: an MCP request without a token gets 401 and a pointer to the metadata", func(t *testing.T) {
		resp := env.do(t, "POST", "/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"initialize"}`), nil)
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("POST /mcp = %d, want 401", resp.StatusCode)
		}
		want := `Bearer resource_metadata="` + env.url + `/.well-known/oauth-protected-resource/mcp", scope="mcp"`
		if got := resp.Header.Get("WWW-Authenticate"); got != want {
			t.Errorf("WWW-Authenticate = %q, want %q", got, want)
		}
	})

	t.Run("step 2: discovery: protected-resource and authorization-server metadata", func(t *testing.T) {
		var prm resourceMetadata
		env.getJSON(t, "/.well-known/oauth-protected-resource/mcp", &prm)
		if prm.Resource != env.url+"/mcp" || !slices.Equal(prm.AuthorizationServers, []string{env.url}) {
			t.Errorf("resource metadata = %+v, want resource %s/mcp, authorization_servers [%s]", prm, env.url, env.url)
		}
		var md serverMetadata
		env.getJSON(t, "/.well-known/oauth-authorization-server", &md)
		if md.Issuer != env.url || md.AuthorizationEndpoint != env.url+"/authorize" || md.TokenEndpoint != env.url+"/token" ||
			md.RegistrationEndpoint != env.url+"/register" || !slices.Equal(md.CodeChallengeMethodsSupported, []string{"S256"}) {
			t.Errorf("server metadata = %+v", md)
		}
	})

	t.Run("step 3: registration", func(t *testing.T) {
		reg := env.register(t, `{"client_name":"Walkthrough client","redirect_uris":["`+redirectURI+`"],
			"token_endpoint_auth_method":"none","grant_types":["authorization_code","refresh_token"],"scope":""}`)
		clientID = reg["client_id"].(string)
		if _, ok := reg["client_secret"]; ok {
			t.Errorf("a public client got a client_secret")
		}
	})

	t.Run("step 4: the browser opens /authorize and sees our consent page", func(t *testing.T) {
		resp := browser.get(t, env.url+"/authorize?"+url.Values{
			"response_type":         {"code"},
			"client_id":             {clientID},
			"redirect_uri":          {redirectURI},
			"code_challenge":        {oauth2.S256ChallengeFromVerifier(verifier)},
			"code_challenge_method": {"S256"},
			"state":                 {state},
			"scope":                 {"claudeai"}, // foreign scopes map to ours
			"resource":              {env.url + "/mcp"},
		}.Encode())
		page := readBody(t, resp)
		if resp.StatusCode != http.StatusOK || !strings.Contains(page, "Walkthrough client") || !strings.Contains(page, "127.0.0.1:7777") ||
			!strings.Contains(page, "the MCP server at "+strings.TrimPrefix(env.url, "http://")) {
			t.Fatalf("GET /authorize = %d, want 200 and a consent page naming the client, its redirect host and this server:\n%s", resp.StatusCode, page)
		}
		if csp := resp.Header.Get("Content-Security-Policy"); resp.Header.Get("X-Frame-Options") != "DENY" ||
			!strings.Contains(csp, "frame-ancestors 'none'") || !strings.Contains(csp, "default-src 'none'") {
			t.Errorf("consent page may be framed: headers %v", resp.Header)
		}
		consentID = consentIDFrom(t, page)
	})

	t.Run("step 5: approving sends the browser to Entra ID with our state, PKCE and nonce", func(t *testing.T) {
		resp := browser.postForm(t, env.url+"/authorize", url.Values{"consent_id": {consentID}, "decision": {"approve"}})
		entraURL = location(t, resp, http.StatusSeeOther)
		q := entraURL.Query()
		if entraURL.Path != "/"+env.entra.tenantID+"/oauth2/v2.0/authorize" || q.Get("client_id") != env.entra.clientID ||
			q.Get("code_challenge_method") != "S256" || q.Get("nonce") == "" || q.Get("state") == "" || q.Get("state") == state ||
			q.Get("redirect_uri") != env.url+"/auth/callback" || q.Get("prompt") != "select_account" ||
			q.Get("scope") != "openid profile offline_access User.Read" {
			t.Errorf("Entra authorize URL = %s", entraURL)
		}
		if q.Has("resource") {
			t.Errorf("the client's resource was forwarded to Entra: %s", entraURL)
		}
	})

	t.Run("step 5: Entra ID signs the user in and redirects to our callback", func(t *testing.T) {
		resp := browser.get(t, entraURL.String())
		u := location(t, resp, http.StatusFound)
		callbackURL = u.String()
		if !strings.HasPrefix(callbackURL, env.url+"/auth/callback?") || u.Query().Get("code") == "" {
			t.Fatalf("Entra redirected to %s, want our callback with a code", callbackURL)
		}
	})

	t.Run("step 6: the callback redeems Entra's code and redirects to the client with ours", func(t *testing.T) {
		resp := browser.get(t, callbackURL)
		u := location(t, resp, http.StatusFound)
		if got := u.Scheme + "://" + u.Host + u.Path; got != redirectURI {
			t.Errorf("redirected to %s, want %s", got, redirectURI)
		}
		if u.Query().Get("state") != state || u.Query().Get("iss") != env.url {
			t.Errorf("state = %q, iss = %q; want the client's %q unchanged, and our issuer (RFC 9207)", u.Query().Get("state"), u.Query().Get("iss"), state)
		}
		code = u.Query().Get("code")
		if code == "" || strings.Contains(callbackURL, code) {
			t.Errorf("code = %q: want a fresh code of our own", code)
		}
	})

	t.Run("step 7: the client redeems the code for our session token", func(t *testing.T) {
		resp := env.postForm(t, "/token", url.Values{
			"grant_type":    {"authorization_code"},
			"code":          {code},
			"redirect_uri":  {redirectURI},
			"client_id":     {clientID},
			"code_verifier": {verifier},
			"resource":      {env.url + "/mcp"},
		}, nil)
		decodeJSON(t, resp, http.StatusOK, &tokens)
		if tokens.TokenType != "Bearer" || tokens.ExpiresIn != 3600 || tokens.RefreshToken == "" || tokens.Scope != "mcp" {
			t.Errorf("token response = %+v", tokens)
		}
		if resp.Header.Get("Cache-Control") != "no-store" {
			t.Errorf("Cache-Control = %q, want no-store", resp.Header.Get("Cache-Control"))
		}
		// The token is readable by anyone who holds it: it must name a
		// session, never the user.
		claims := tokenClaims(t, tokens.AccessToken)
		for _, secret := range []string{env.entra.user.oid, env.entra.tenantID, env.entra.user.name, env.entra.user.upn} {
			if strings.Contains(fmt.Sprint(claims), secret) {
				t.Errorf("session token claims %v reveal %q", claims, secret)
			}
		}
		if claims["aud"] != env.url+"/mcp" || claims["client_id"] != clientID || claims["scope"] != "mcp" {
			t.Errorf("session token claims = %v", claims)
		}
	})

	t.Run("step 8: initialize over Streamable HTTP starts an MCP session", func(t *testing.T) {
		c = &mcpClient{env: env, token: tokens.AccessToken}
		resp := c.post(t, `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`, nil)
		var init rpcReply
		decodeJSON(t, resp, http.StatusOK, &init)
		c.sessionID, c.version = resp.Header.Get("Mcp-Session-Id"), "2025-06-18"
		if !regexp.MustCompile(`^[\x21-\x7e]{20,}$`).MatchString(c.sessionID) {
			t.Errorf("Mcp-Session-Id = %q, want a long visible-ASCII id", c.sessionID)
		}
		if !strings.Contains(string(init.Result), `"protocolVersion":"2025-06-18"`) || resp.Header.Get("Content-Type") != "application/json" {
			t.Errorf("initialize = %s (%s)", init.Result, resp.Header.Get("Content-Type"))
		}
	})
	t.Run("step 9: notifications/initialized gets 202, tools/list lists the tool", func(t *testing.T) {
		resp := c.post(t, `{"jsonrpc":"2.0","method":"notifications/initialized"}`, nil)
		if resp.StatusCode != http.StatusAccepted || readBody(t, resp) != "" {
			t.Errorf("notifications/initialized = %d, want 202 and no body", resp.StatusCode)
		}
		var list struct{ Tools []tool }
		c.call(t, "tools/list", "", &list)
		if len(list.Tools) != 1 || list.Tools[0].Name != "getUserDetails" || list.Tools[0].OutputSchema == nil {
			t.Errorf("tools/list = %+v, want getUserDetails with an outputSchema (2025-06-18)", list)
		}
	})
	t.Run("step 10: getUserDetails answers with the user's profile from Graph", func(t *testing.T) {
		var result struct {
			toolResult
			StructuredContent userDetails `json:"structuredContent"`
		}
		c.call(t, "tools/call", `{"name":"getUserDetails","arguments":{}}`, &result)
		want := "Display name: Adele Vance\nMail: adele.vance@contoso.example\nUser principal name: adele.vance@contoso.example"
		if result.IsError || len(result.Content) != 1 || result.Content[0].Text != want || result.StructuredContent.DisplayName != "Adele Vance" {
			t.Errorf("tools/call = %+v, want the text %q and structured content", result, want)
		}
	})
	t.Run("the client ends the MCP session: DELETE, then 404", func(t *testing.T) {
		resp := env.do(t, "DELETE", "/mcp", nil, c.headers(nil))
		if resp.StatusCode != http.StatusNoContent {
			t.Fatalf("DELETE /mcp = %d, want 204", resp.StatusCode)
		}
		if resp := c.post(t, `{"jsonrpc":"2.0","id":9,"method":"ping"}`, nil); resp.StatusCode != http.StatusNotFound {
			t.Errorf("ping after DELETE = %d, want 404", resp.StatusCode)
		}
	})
}

// TestSSEWalkthrough is steps 1 and 8 to 10 over HTTP+SSE, as older clients
// run them (steps 2 to 7 are those of TestWalkthrough).
func TestSSEWalkthrough(t *testing.T) {
	env := newTestEnv(t)
	ctx := t.Context() // the stream opened in step 8 lives on through step 10
	var tokens signedIn
	var conn *sseConn

	t.Run("step 1: GET /sse without a token gets 401 pointing at the /sse metadata", func(t *testing.T) {
		resp := env.do(t, "GET", "/sse", nil, nil)
		want := `Bearer resource_metadata="` + env.url + `/.well-known/oauth-protected-resource/sse", scope="mcp"`
		if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") != want {
			t.Errorf("GET /sse = %d %q, want 401 %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), want)
		}
	})
	t.Run("steps 2 to 7: sign in for the /sse resource", func(t *testing.T) {
		tokens = env.signIn(t, signInOptions{resource: env.url + "/sse"})
	})
	t.Run("step 8: the client opens the SSE stream with the session token", func(t *testing.T) {
		conn = env.connectUntil(t, ctx, tokens.AccessToken)
		if !strings.HasPrefix(conn.endpoint, "/message?sessionId=") {
			t.Errorf("endpoint event = %q", conn.endpoint)
		}
	})

	t.Run("step 9: initialize, initialized, tools/list, answered on the stream", func(t *testing.T) {
		var init struct {
			ProtocolVersion string
			ServerInfo      struct{ Name string }
			Capabilities    map[string]any
		}
		conn.call(t, "initialize", `{"protocolVersion":"2024-11-05","capabilities":{},"clientInfo":{"name":"test","version":"1"}}`, &init)
		if init.ProtocolVersion != "2024-11-05" || init.ServerInfo.Name != "entra-mcp" || init.Capabilities["tools"] == nil {
			t.Errorf("initialize = %+v", init)
		}
		if resp := conn.post(t, `{"jsonrpc":"2.0","method":"notifications/initialized"}`); resp.StatusCode != http.StatusAccepted {
			t.Errorf("notifications/initialized = %d, want 202", resp.StatusCode)
		}
		var list struct{ Tools []tool }
		conn.call(t, "tools/list", `{}`, &list)
		if len(list.Tools) != 1 || list.Tools[0].Name != "getUserDetails" {
			t.Errorf("tools/list = %+v", list)
		}
	})

	t.Run("step 10: getUserDetails answers with the user's profile from Graph", func(t *testing.T) {
		var result toolResult
		conn.call(t, "tools/call", `{"name":"getUserDetails","arguments":{}}`, &result)
		want := "Display name: Adele Vance\nMail: adele.vance@contoso.example\nUser principal name: adele.vance@contoso.example"
		if result.IsError || len(result.Content) != 1 || result.Content[0].Text != want {
			t.Errorf("tools/call = %+v, want the text %q", result, want)
		}
	})
}

// TestModernWalkthrough is a client of MCP 2026-07-28 after signing in: no
// initialize, no Mcp-Session-Id; each request carries its protocol version and
// capabilities in _meta and mirrors its method in headers.
func TestModernWalkthrough(t *testing.T) {
	env := newTestEnv(t)
	var c *modernClient

	t.Run("step 1: a request without a token gets 401, as in every era", func(t *testing.T) {
		resp := (&modernClient{env: env}).post(t, "server/discover", `{}`, http.Header{"Authorization": nil})
		// No offline_access in the challenge's scope (2026-07-28 "Refresh Tokens").
		want := `Bearer resource_metadata="` + env.url + `/.well-known/oauth-protected-resource/mcp", scope="mcp"`
		if got := resp.Header.Get("WWW-Authenticate"); resp.StatusCode != http.StatusUnauthorized || got != want {
			t.Fatalf("server/discover without a token = %d %q, want 401 %q", resp.StatusCode, got, want)
		}
	})
	t.Run("steps 2 to 7: sign in for /mcp", func(t *testing.T) {
		c = &modernClient{env: env, token: env.signIn(t, signInOptions{resource: env.url + "/mcp"}).AccessToken}
	})

	t.Run("step 8: server/discover instead of initialize", func(t *testing.T) {
		resp := c.post(t, "server/discover", `{}`, nil)
		var discover struct {
			ResultType        string
			SupportedVersions []string
			Capabilities      map[string]any
			TTLMs             *int64 `json:"ttlMs"`
			CacheScope        string
			Meta              map[string]struct{ Name string } `json:"_meta"`
		}
		c.result(t, resp, &discover)
		if resp.Header.Get("Mcp-Session-Id") != "" {
			t.Errorf("Mcp-Session-Id = %q, want none", resp.Header.Get("Mcp-Session-Id"))
		}
		// The TypeScript client falls back to initialize if one of these is missing.
		if discover.ResultType != "complete" || discover.SupportedVersions[0] != "2026-07-28" || discover.Capabilities["tools"] == nil ||
			discover.TTLMs == nil || discover.CacheScope != "public" || discover.Meta[metaServerInfo].Name != "entra-mcp" {
			t.Errorf("server/discover = %+v", discover)
		}
	})

	t.Run("step 9: tools/list, with its caching hints", func(t *testing.T) {
		var list struct {
			ResultType string
			Tools      []tool
			TTLMs      *int64 `json:"ttlMs"`
			CacheScope string
		}
		c.result(t, c.post(t, "tools/list", `{}`, nil), &list)
		if list.ResultType != "complete" || len(list.Tools) != 1 || list.Tools[0].OutputSchema == nil || list.TTLMs == nil || list.CacheScope == "" {
			t.Errorf("tools/list = %+v", list)
		}
	})

	t.Run("step 10: tools/call, with the tool's name in Mcp-Name", func(t *testing.T) {
		var result struct {
			toolResult
			ResultType string
		}
		c.result(t, c.post(t, "tools/call", `{"name":"getUserDetails","arguments":{}}`, nil), &result)
		if result.ResultType != "complete" || result.IsError || result.StructuredContent == nil ||
			!strings.Contains(result.Content[0].Text, "Adele Vance") {
			t.Errorf("tools/call = %+v", result)
		}
	})
}

// TestCIMDWalkthrough is a client that identifies by the URL of its metadata
// document (CIMD) instead of registering: the server fetches the document at
// /authorize, and from then on the client is one like any other.
func TestCIMDWalkthrough(t *testing.T) {
	env := newTestEnv(t)
	docs := env.publishDocuments(t)
	c := docs.publish("/oauth/client.json", `"client_uri":"https://app.example.com/"`)
	b := newBrowser(t)
	var consentID, code string
	var tokens tokenResponse

	t.Run("step 2: the metadata says client metadata documents are welcome", func(t *testing.T) {
		var md map[string]any
		env.getJSON(t, "/.well-known/oauth-authorization-server", &md)
		if md["client_id_metadata_document_supported"] != true || !slices.Contains(md["token_endpoint_auth_methods_supported"].([]any), any("none")) {
			t.Errorf("server metadata = %v", md)
		}
	})
	t.Run("step 3 is skipped: /authorize fetches the document and shows its host", func(t *testing.T) {
		page := readBody(t, b.get(t, env.url+c.authorizeURL(nil))) // port 7777: the document lists 127.0.0.1 without one
		consentID = consentIDFrom(t, page)
		host := strings.TrimPrefix(docs.url(""), "https://")
		for _, want := range []string{"“Document client” of " + host + " to use", "described by <strong>" + host + "</strong>", "<strong>Warning:</strong>"} {
			if !strings.Contains(page, want) {
				t.Errorf("consent page lacks %q:\n%s", want, page)
			}
		}
		if docs.fetches.Load() != 1 {
			t.Errorf("document fetched %d times, want 1", docs.fetches.Load())
		}
	})
	t.Run("steps 4 to 6: consent, Entra, and back with our code", func(t *testing.T) {
		entraURL := location(t, b.postForm(t, env.url+"/authorize", url.Values{"consent_id": {consentID}, "decision": {"approve"}}), http.StatusSeeOther)
		back := location(t, b.get(t, location(t, b.get(t, entraURL.String()), http.StatusFound).String()), http.StatusFound)
		if code = back.Query().Get("code"); code == "" || !strings.HasPrefix(back.String(), c.redirectURI) {
			t.Fatalf("redirected to %s, want %s with a code", back, c.redirectURI)
		}
	})
	t.Run("step 7: the token request names the URL as client_id, with no secret", func(t *testing.T) {
		tokens = env.redeem(t, c, code)
		if tokens.RefreshToken == "" {
			t.Errorf("no refresh token: a document without grant_types gets both grants")
		}
	})
	t.Run("steps 8 to 10: the tool, as for any client", func(t *testing.T) {
		m := &modernClient{env: env, token: tokens.AccessToken}
		var result toolResult
		m.result(t, m.post(t, "tools/call", `{"name":"getUserDetails","arguments":{}}`, nil), &result)
		if result.IsError || !strings.Contains(result.Content[0].Text, "Adele Vance") {
			t.Errorf("tools/call = %+v", result)
		}
	})
	t.Run("refresh, without fetching the document again", func(t *testing.T) {
		var refreshed tokenResponse
		decodeJSON(t, env.refresh(t, tokens.RefreshToken, c.id), http.StatusOK, &refreshed)
		if refreshed.AccessToken == "" || docs.fetches.Load() != 1 {
			t.Errorf("refresh = %+v, document fetched %d times, want 1", refreshed, docs.fetches.Load())
		}
	})
}

// TestCertificateWalkthrough is a server without a client secret: every token
// request to Entra ID, the code's redemption and each refresh of the Entra
// token, carries a fresh assertion signed with its certificate's key.
func TestCertificateWalkthrough(t *testing.T) {
	env, _ := newCertificateEnv(t)
	env.entra.set(func() { env.entra.expiresIn = 600 })
	c := &modernClient{env: env}
	var first string

	t.Run("steps 2 to 7: the code is redeemed with an assertion, not a secret", func(t *testing.T) {
		c.token = env.signIn(t, signInOptions{}).AccessToken
		env.entra.set(func() { first = env.entra.lastAssertion })
		header, claims := jwtParts(t, first)
		if header["alg"] != "PS256" || header["typ"] != "JWT" || header["x5t#S256"] != thumbprint(env.cfg.certificate.cert) ||
			claims["iss"] != env.entra.clientID || claims["sub"] != env.entra.clientID ||
			claims["aud"] != env.entra.URL+"/"+env.entra.tenantID+"/oauth2/v2.0/token" || claims["jti"] == "" {
			t.Errorf("assertion header %v, claims %v", header, claims)
		}
	})
	t.Run("step 10: the Entra token, renewed with another assertion", func(t *testing.T) {
		env.clock.advance(10 * time.Minute)
		var result toolResult
		c.result(t, c.post(t, "tools/call", `{"name":"getUserDetails","arguments":{}}`, nil), &result)
		env.entra.mu.Lock()
		defer env.entra.mu.Unlock()
		refresh := env.entra.refreshes[len(env.entra.refreshes)-1]
		if result.IsError || refresh.Get("client_assertion") == "" || refresh.Has("client_secret") || refresh.Get("client_assertion") == first {
			t.Errorf("tools/call = %+v; the refresh sent assertion %t, secret %t", result, refresh.Get("client_assertion") != "", refresh.Has("client_secret"))
		}
	})
	t.Run("no assertion, and no part of the key, in the log", func(t *testing.T) {
		keyDER, _ := x509.MarshalPKCS8PrivateKey(env.cfg.certificate.key)
		key := base64.StdEncoding.EncodeToString(keyDER)
		if logs := env.logs.String(); strings.Contains(logs, first[:40]) || strings.Contains(logs, key[40:80]) ||
			strings.Contains(logs, env.cfg.certificate.key.D.String()[:20]) || strings.Contains(logs, fmt.Sprintf("%x", env.cfg.certificate.key.D)[:20]) {
			t.Errorf("the log holds an assertion or the key")
		}
	})
}

// TestFederatedWalkthrough is a server whose credential is a token another
// identity provider issued to it, in a file the platform rewrites: each token
// request sends what the file holds then.
func TestFederatedWalkthrough(t *testing.T) {
	env, issuer := newFederatedEnv(t)
	env.entra.set(func() { env.entra.expiresIn = 600 })
	c := &modernClient{env: env, token: env.signIn(t, signInOptions{}).AccessToken}
	call := func(t *testing.T) {
		t.Helper()
		env.clock.advance(10 * time.Minute) // the Entra token expires: it is renewed
		var result toolResult
		c.result(t, c.post(t, "tools/call", `{"name":"getUserDetails","arguments":{}}`, nil), &result)
		if result.IsError {
			t.Fatalf("tools/call = %+v", result)
		}
	}
	for i := range 2 {
		t.Run(fmt.Sprintf("refresh %d, after the platform wrote a new token", i+1), func(t *testing.T) {
			token := issuer.write(t, env.clock.now().Add(time.Hour))
			call(t)
			if env.entra.set(func() {}); env.entra.lastAssertion != token {
				t.Errorf("the refresh sent another token than the file held")
			}
			if strings.Contains(env.logs.String(), token[:40]) {
				t.Errorf("the log holds the federated token")
			}
		})
	}
}

// Example_sessionToken shows what a session token carries: a fixed header
// with the key id and format version, and claims that name a session.
func Example_sessionToken() {
	c := newSessionCodec("http://localhost:3001", func() time.Time { return time.Unix(1e9, 0) }, make([]byte, 32))
	token := c.mint(sessionClaims{Audience: "http://localhost:3001/sse", Subject: "QmFzZTY0U3ViamVjdA", SessionID: "SESSIONID",
		ClientID: "CLIENTID", Scope: "mcp", IssuedAt: 1e9, Expiry: 1e9 + 3600, TokenID: "TOKENID"})
	header, payload, _, _ := cut3(token)
	for _, part := range []string{header, payload} {
		b, _ := base64.RawURLEncoding.DecodeString(part)
		fmt.Println(string(b))
	}
	// Output:
	// {"alg":"HS256","typ":"at+jwt","kid":"24672a10","ver":1}
	// {"iss":"http://localhost:3001","aud":"http://localhost:3001/sse","sub":"QmFzZTY0U3ViamVjdA","sid":"SESSIONID","client_id":"CLIENTID","scope":"mcp","iat":1000000000,"exp":1000003600,"jti":"TOKENID"}
}

// ---- Step 1: the challenge and the session token ----

func TestChallengeRejectsBadTokens(t *testing.T) {
	env := newTestEnv(t)
	good := env.signIn(t, signInOptions{})
	otherKey := newSessionCodec(env.url, env.clock.now, randomBytes(32))
	claims := tokenClaims(t, good.AccessToken)
	forge := func(c *sessionCodec, edit func(*sessionClaims)) string {
		sc := sessionClaims{Audience: env.url, Subject: claims["sub"].(string), SessionID: claims["sid"].(string),
			ClientID: claims["client_id"].(string), Scope: "mcp", IssuedAt: env.clock.now().Unix(), Expiry: env.clock.now().Add(time.Hour).Unix()}
		edit(&sc)
		return c.mint(sc)
	}
	header, payload, sig, _ := cut3(good.AccessToken)
	noneHeader := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","typ":"at+jwt","kid":"x","ver":1}`))

	tests := []struct {
		name, authorization, wantError string
	}{
		{"no token", "", ""},
		{"another scheme", "Basic dXNlcjpwYXNz", ""},
		{"garbage", "Bearer garbage", "invalid_token"},
		{"tampered claims", "Bearer " + header + "." + payload + "x." + sig, "invalid_token"},
		{"truncated signature", "Bearer " + header + "." + payload + "." + sig[:10], "invalid_token"},
		{"alg none", "Bearer " + noneHeader + "." + payload + ".", "invalid_token"},
		{"swapped algorithm", "Bearer " + base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"RS256","typ":"at+jwt","kid":"x","ver":1}`)) + "." + payload + "." + sig, "invalid_token"},
		{"extended signature", "Bearer " + header + "." + payload + "." + sig + "AA", "invalid_token"},
		{"signed with another key", "Bearer " + forge(otherKey, func(*sessionClaims) {}), "invalid_token"},
		{"for another resource", "Bearer " + forge(env.srv.tokens, func(c *sessionClaims) { c.Audience = env.url + "/elsewhere" }), "invalid_token"},
		{"for another issuer", "Bearer " + newSessionCodec("https://evil.example", env.clock.now, env.srv.cfg.sessionKeys...).mint(sessionClaims{Audience: env.url, SessionID: claims["sid"].(string), Expiry: env.clock.now().Add(time.Hour).Unix()}), "invalid_token"},
		{"unknown session", "Bearer " + forge(env.srv.tokens, func(c *sessionClaims) { c.SessionID = "nope" }), "invalid_token"},
		{"an Entra access token", "Bearer " + env.entra.lastAccessToken(), "invalid_token"},
		{"an Entra id_token", "Bearer " + env.entra.mintIDToken(map[string]any{"aud": env.entra.clientID}), "invalid_token"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, path := range []string{"/sse", "/message?sessionId=x", "/mcp"} {
				method := map[string]string{"/sse": "GET", "/message?sessionId=x": "POST", "/mcp": "POST"}[path]
				metadata := map[string]string{"/sse": "/sse", "/message?sessionId=x": "/sse", "/mcp": "/mcp"}[path]
				h := http.Header{}
				if tt.authorization != "" {
					h.Set("Authorization", tt.authorization)
				}
				resp := env.do(t, method, path, strings.NewReader(`{}`), h)
				if resp.StatusCode != http.StatusUnauthorized {
					t.Fatalf("%s %s = %d, want 401", method, path, resp.StatusCode)
				}
				challenge := resp.Header.Get("WWW-Authenticate")
				if !strings.Contains(challenge, `resource_metadata="`+env.url+`/.well-known/oauth-protected-resource`+metadata+`"`) {
					t.Errorf("%s %s: WWW-Authenticate = %q, want the %s metadata", method, path, challenge, metadata)
				}
				if hasErr := strings.Contains(challenge, `error="invalid_token"`); hasErr != (tt.wantError != "") {
					t.Errorf("%s %s: WWW-Authenticate = %q, want error=%q", method, path, challenge, tt.wantError)
				}
				wantOAuthError(t, resp, http.StatusUnauthorized, cmp.Or(tt.wantError, "unauthorized"))
			}
		})
	}

	t.Run("expired", func(t *testing.T) {
		env.clock.advance(time.Hour)
		resp := env.do(t, "GET", "/sse", nil, bearer(good.AccessToken))
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), "expired") {
			t.Errorf("GET /sse with an expired token = %d %q, want 401 invalid_token", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	})
}

// TestTokenCodecIsStrict checks each refusal of the token codec on its own:
// every bad token below is good but for one thing, so that no check can hide
// behind another.
func TestTokenCodecIsStrict(t *testing.T) {
	now := func() time.Time { return time.Unix(1e9, 0) }
	key := randomBytes(32)
	c := newSessionCodec("https://mcp.example", now, key)
	good := sessionClaims{Audience: "https://mcp.example", SessionID: "s", ClientID: "c", Expiry: 2e9}
	long, expired := good, good
	long.Scope = strings.Repeat("x", maxTokenLen)
	expired.Expiry = 1e9
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	// respell gives a MAC the same bytes in another spelling: its last
	// character carries two unused bits, which a lax decoder ignores.
	respell := func(mac string) string {
		last := strings.IndexByte(alphabet, mac[len(mac)-1])
		return mac[:len(mac)-1] + string(alphabet[last^1])
	}
	h, p, sig, _ := cut3(c.mint(good))
	tests := []struct {
		name, token string
		want        error
	}{
		{"good", c.mint(good), nil},
		{"another issuer, with the same key", newSessionCodec("https://evil.example", now, key).mint(good), errTokenIssuer},
		{"expired", c.mint(expired), errTokenExpired},
		{"signed, but longer than maxTokenLen", c.mint(long), errTokenMalformed},
		{"a newline inside the MAC", h + "." + p + "." + sig[:9] + "\n" + sig[9:], errTokenMalformed},
		{"the MAC spelled another way", h + "." + p + "." + respell(sig), errTokenMalformed},
		{"four parts", h + "." + p + ".x." + sig, errTokenMalformed},
		{"a MAC that does not match", h + "." + p + "." + sig[:5] + string(alphabet[(strings.IndexByte(alphabet, sig[5])+1)%64]) + sig[6:], errTokenSignature},
	}
	for _, tt := range tests {
		if _, err := c.verify(tt.token); !errors.Is(err, tt.want) && !(err == nil && tt.want == nil) {
			t.Errorf("verify(%s) = %v, want %v", tt.name, err, tt.want)
		}
	}

	rt := c.refreshToken("SID", 7)
	i := strings.LastIndexByte(rt, '.')
	for _, tt := range []struct {
		name, token string
		ok          bool
	}{
		{"good", rt, true},
		{"a newline inside the MAC", rt[:i+9] + "\n" + rt[i+9:], false},
		{"the MAC spelled another way", rt[:i+1] + respell(rt[i+1:]), false},
		{"signed, but longer than maxTokenLen", c.refreshToken(strings.Repeat("S", maxTokenLen), 7), false},
		{"signed with another key", newSessionCodec("https://mcp.example", now, randomBytes(32)).refreshToken("SID", 7), false},
	} {
		if sid, gen, ok := c.parseRefreshToken(tt.token); ok != tt.ok || ok && (sid != "SID" || gen != 7) {
			t.Errorf("parseRefreshToken(%s) = %q, %d, %v; want ok=%v", tt.name, sid, gen, ok, tt.ok)
		}
	}
}

func TestSessionTokenEncodingIsUnambiguous(t *testing.T) {
	c := newSessionCodec("https://mcp.example", func() time.Time { return time.Unix(1e9, 0) }, make([]byte, 32))
	token := c.mint(sessionClaims{Audience: "https://mcp.example", SessionID: "s", Expiry: 2e9})
	if _, err := c.verify(token); err != nil {
		t.Fatalf("verify(mint()) = %v", err)
	}
	header, payload, sig, _ := cut3(token)
	// Moving the boundary between the parts must break the MAC, and so must
	// any change to any part. (Other spellings of the MAC: TestTokenCodecIsStrict.)
	for _, bad := range []string{
		header[:len(header)-1] + "." + header[len(header)-1:] + payload + "." + sig,
		header + payload[:1] + "." + payload[1:] + "." + sig,
		header + "." + payload + "." + sig + "A",
		header + "." + payload + ".." + sig,
		token + ".",
	} {
		if _, err := c.verify(bad); err == nil {
			t.Errorf("verify(%q) = nil, want an error", bad)
		}
	}
}

// ---- Step 2: discovery ----

func TestDiscovery(t *testing.T) {
	env := newTestEnv(t)
	for path, resource := range map[string]string{
		"/.well-known/oauth-protected-resource":     env.url,
		"/.well-known/oauth-protected-resource/sse": env.url + "/sse",
		"/.well-known/oauth-protected-resource/mcp": env.url + "/mcp",
	} {
		var prm resourceMetadata
		env.getJSON(t, path, &prm)
		if prm.Resource != resource || !slices.Equal(prm.AuthorizationServers, []string{env.url}) || !slices.Equal(prm.ScopesSupported, []string{"mcp"}) {
			t.Errorf("GET %s = %+v, want resource %s", path, prm, resource)
		}
	}
	var md map[string]any
	env.getJSON(t, "/.well-known/oauth-authorization-server", &md)
	want := map[string]any{
		"issuer":                                         env.url,
		"revocation_endpoint":                            env.url + "/revoke",
		"response_types_supported":                       []any{"code"},
		"grant_types_supported":                          []any{"authorization_code", "refresh_token"},
		"code_challenge_methods_supported":               []any{"S256"},
		"token_endpoint_auth_methods_supported":          []any{"client_secret_basic", "client_secret_post", "none"},
		"scopes_supported":                               []any{"mcp"},
		"authorization_response_iss_parameter_supported": true,
	}
	for k, v := range want {
		if fmt.Sprint(md[k]) != fmt.Sprint(v) {
			t.Errorf("metadata %s = %v, want %v", k, md[k], v)
		}
	}
}

// ---- Step 3: registration ----

func TestRegister(t *testing.T) {
	env := newTestEnv(t)
	t.Run("defaults", func(t *testing.T) {
		reg := env.register(t, `{"redirect_uris":["https://vscode.dev/redirect","http://127.0.0.1/"],"unknown_field":1}`)
		if reg["token_endpoint_auth_method"] != "client_secret_basic" || reg["client_secret"] == nil || reg["client_secret_expires_at"] != 0.0 {
			t.Errorf("registration without token_endpoint_auth_method = %v, want a client_secret_basic client with a secret", reg)
		}
		if fmt.Sprint(reg["grant_types"]) != "[authorization_code refresh_token]" || fmt.Sprint(reg["response_types"]) != "[code]" || reg["scope"] != "mcp" {
			t.Errorf("registration defaults = %v", reg)
		}
	})
	t.Run("accepted redirect URIs", func(t *testing.T) {
		for _, u := range []string{"cursor://anysphere.cursor-mcp/oauth/callback", "http://localhost:6274/oauth/callback", "http://[::1]:8080/cb",
			"https://claude.ai/api/mcp/auth_callback", "com.example.app:/oauth2redirect", "https://xn--micrsoft-6ug.com/cb"} {
			env.register(t, `{"redirect_uris":["`+u+`"],"token_endpoint_auth_method":"none"}`)
		}
	})
	t.Run("lists are kept without repeats, and a body is at most 8 KB", func(t *testing.T) {
		grants := `"authorization_code"` + strings.Repeat(`,"refresh_token"`, 400)
		reg := env.register(t, `{"redirect_uris":["http://127.0.0.1/cb","http://127.0.0.1/cb"],"grant_types":[`+grants+`],"response_types":["code","code"],"token_endpoint_auth_method":"none"}`)
		if fmt.Sprint(reg["redirect_uris"], reg["grant_types"], reg["response_types"]) != "[http://127.0.0.1/cb] [authorization_code refresh_token] [code]" {
			t.Errorf("registered %v %v %v, want each value once", reg["redirect_uris"], reg["grant_types"], reg["response_types"])
		}
		big := `{"redirect_uris":["http://127.0.0.1/cb"],"client_name":"` + strings.Repeat("x", maxRegistration) + `"}`
		wantOAuthError(t, env.do(t, "POST", "/register", strings.NewReader(big), http.Header{"Content-Type": {"application/json"}}), http.StatusRequestEntityTooLarge, "invalid_request")
	})
	t.Run("the consent page names a private-use scheme's application, not the host after it", func(t *testing.T) {
		reg := env.register(t, `{"redirect_uris":["com.evil.app://login.microsoftonline.com/cb"],"token_endpoint_auth_method":"none"}`)
		c := &testClient{id: reg["client_id"].(string), redirectURI: "com.evil.app://login.microsoftonline.com/cb", verifier: oauth2.GenerateVerifier()}
		page := readBody(t, newBrowser(t).get(t, env.url+c.authorizeURL(nil)))
		if !strings.Contains(page, "<strong>com.evil.app://login.microsoftonline.com</strong>") {
			t.Errorf("consent page for com.evil.app://login.microsoftonline.com/cb does not name com.evil.app:\n%s", page)
		}
	})
	t.Run("application_type is accepted, whatever it says, and kept if native or web (MCP 2026-07-28)", func(t *testing.T) {
		for at, want := range map[string]any{"native": "native", "web": "web", "something-new": nil, "web\u202e": nil} {
			reg := env.register(t, `{"redirect_uris":["http://127.0.0.1/cb"],"application_type":"`+at+`","token_endpoint_auth_method":"none"}`)
			if reg["application_type"] != want {
				t.Errorf("application_type %q registered as %v, want %v", at, reg["application_type"], want)
			}
		}
	})
	t.Run("Cursor's registration, as Cursor sends it", func(t *testing.T) {
		env.register(t, `{"redirect_uris":["cursor://anysphere.cursor-mcp/oauth/callback","https://www.cursor.com/agents/mcp/oauth/callback",`+
			`"http://localhost:8787/callback"],"token_endpoint_auth_method":"none","grant_types":["authorization_code","refresh_token"],`+
			`"response_types":["code"],"client_name":"Cursor"}`)
	})

	tests := []struct{ name, body, wantError string }{
		{"not JSON", `redirect_uris=x`, "invalid_client_metadata"},
		{"wrong type", `{"redirect_uris":"https://a.example/cb"}`, "invalid_client_metadata"},
		{"no redirect URIs", `{"client_name":"x"}`, "invalid_redirect_uri"},
		{"http, not loopback", `{"redirect_uris":["http://evil.example/cb"]}`, "invalid_redirect_uri"},
		{"javascript", `{"redirect_uris":["javascript:alert(1)"]}`, "invalid_redirect_uri"},
		{"an OS handler: ms-msdt", `{"redirect_uris":["ms-msdt:/id PCWDiagnostic"]}`, "invalid_redirect_uri"},
		{"an OS handler: search-ms", `{"redirect_uris":["search-ms:query=x"]}`, "invalid_redirect_uri"},
		{"an OS handler: ms-settings", `{"redirect_uris":["ms-settings:privacy"]}`, "invalid_redirect_uri"},
		{"mailto", `{"redirect_uris":["mailto:victim@example.com"]}`, "invalid_redirect_uri"},
		{"tel", `{"redirect_uris":["tel:+15555550100"]}`, "invalid_redirect_uri"},
		{"view-source", `{"redirect_uris":["view-source:https://a.example/"]}`, "invalid_redirect_uri"},
		{"jar", `{"redirect_uris":["jar:https://a.example/x.jar!/"]}`, "invalid_redirect_uri"},
		{"a look-alike host (Cyrillic o)", `{"redirect_uris":["https://micr\u043esoft.com/cb"]}`, "invalid_redirect_uri"},
		{"a look-alike host, percent-encoded", `{"redirect_uris":["https://micr%D0%BEsoft.com/cb"]}`, "invalid_redirect_uri"},
		{"a look-alike private-use host", `{"redirect_uris":["com.example.app://micr\u043esoft.com/cb"]}`, "invalid_redirect_uri"},
		{"a zero-width space", `{"redirect_uris":["https://a.example/\u200bcb"]}`, "invalid_redirect_uri"},
		{"user info before the host", `{"redirect_uris":["https://login.microsoftonline.com@evil.example/cb"]}`, "invalid_redirect_uri"},
		{"no host but a port", `{"redirect_uris":["https://:443/cb"]}`, "invalid_redirect_uri"},
		{"a percent sign in the host", `{"redirect_uris":["https://evil%25.example/cb"]}`, "invalid_redirect_uri"},
		{"an IPv6 zone in the host", `{"redirect_uris":["https://[fe80::1%25evil.example]/cb"]}`, "invalid_redirect_uri"},
		{"a bidi override", `{"redirect_uris":["https://a.example/\u202ebc"]}`, "invalid_redirect_uri"},
		{"a bidi override in client_name", `{"redirect_uris":["https://a.example/cb"],"client_name":"Good \u202eenilno"}`, "invalid_client_metadata"},
		{"a control character in client_name", `{"redirect_uris":["https://a.example/cb"],"client_name":"a\u0007b"}`, "invalid_client_metadata"},
		{"a blank filler in client_name", `{"redirect_uris":["https://a.example/cb"],"client_name":"Good\u3164App"}`, "invalid_client_metadata"},
		{"fragment", `{"redirect_uris":["https://a.example/cb#x"]}`, "invalid_redirect_uri"},
		{"relative", `{"redirect_uris":["/cb"]}`, "invalid_redirect_uri"},
		{"unknown auth method", `{"redirect_uris":["https://a.example/cb"],"token_endpoint_auth_method":"private_key_jwt"}`, "invalid_client_metadata"},
		{"implicit grant", `{"redirect_uris":["https://a.example/cb"],"grant_types":["implicit"]}`, "invalid_client_metadata"},
		{"token response type", `{"redirect_uris":["https://a.example/cb"],"response_types":["token"]}`, "invalid_client_metadata"},
		{"a member twice", `{"redirect_uris":["https://a.example/cb"],"redirect_uris":["https://b.example/cb"]}`, "invalid_client_metadata"},
		{"too many redirect URIs, once each", `{"redirect_uris":["https://a.example/1","https://a.example/2","https://a.example/3","https://a.example/4",` +
			`"https://a.example/5","https://a.example/6","https://a.example/7","https://a.example/8","https://a.example/9","https://a.example/10","https://a.example/11"]}`, "invalid_redirect_uri"},
		{"a member in another case", `{"redirect_uris":["https://a.example/cb"],"Token_Endpoint_Auth_Method":"none"}`, "invalid_client_metadata"},
		{"a member twice, after an empty name", `{"":"z","redirect_uris":["https://evil.example/cb"],"redirect_uris":["https://good.example/cb"]}`, "invalid_client_metadata"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := env.do(t, "POST", "/register", strings.NewReader(tt.body), http.Header{"Content-Type": {"application/json"}})
			wantOAuthError(t, resp, http.StatusBadRequest, tt.wantError)
		})
	}
}

// TestClientMetadataDocuments holds clients that identify by a metadata
// document to the rules registration follows, and to the CIMD draft's: the
// client_id URL's form, the document's, how it is fetched, and how long kept.
// Every failure is an error page naming the document's host: never a
// redirect, since the redirect URI is not known to be the client's.
func TestClientMetadataDocuments(t *testing.T) {
	env := newTestEnv(t)
	docs := env.publishDocuments(t)
	host := strings.TrimPrefix(docs.url(""), "https://")
	json := http.Header{"Content-Type": {"application/json"}}
	doc := func(path, members string) string {
		return `{"client_id":"` + docs.url(path) + `","client_name":"Test","redirect_uris":["http://127.0.0.1/callback"]` + members + `}`
	}
	wantPage := func(t *testing.T, c *testClient, status int, want string) {
		t.Helper()
		resp := newBrowser(t).get(t, env.url+c.authorizeURL(nil))
		page := readBody(t, resp)
		if resp.StatusCode != status || resp.Header.Get("Location") != "" || !strings.Contains(page, want) {
			t.Errorf("GET /authorize = %d, Location %q; want a %d page saying %q:\n%s", resp.StatusCode, resp.Header.Get("Location"), status, want, page)
		}
	}

	t.Run("the client_id URL", func(t *testing.T) {
		for _, id := range []string{
			"https://app.example.com", "https://app.example.com/", "https://app.example.com/c.json#x", "https://user@app.example.com/c.json",
			"https://app.example.com/a/../c.json", "https://app.example.com/a/%2e%2E/c.json", "https://app.example.com/./c.json",
			"https://xn--pp-7ka.example.com\u200b/c.json", "https://\u0430pp.example.com/c.json",
			"https://app.example.com/" + strings.Repeat("x", 2000),
		} {
			wantPage(t, &testClient{id: id, redirectURI: "http://127.0.0.1/callback", verifier: oauth2.GenerateVerifier()}, http.StatusBadRequest, "cannot be used")
		}
		if docs.fetches.Load() != 0 {
			t.Errorf("%d fetches for URLs that are never fetched", docs.fetches.Load())
		}
	})

	tests := []struct {
		name, body string
		status     int
		header     http.Header
		want       string // on the error page
	}{
		{"client_id is another URL", `{"client_id":"https://other.example.com/c.json","redirect_uris":["http://127.0.0.1/cb"]}`, 200, json, "not the URL it was fetched from"},
		{"no client_id", `{"redirect_uris":["http://127.0.0.1/cb"]}`, 200, json, "not the URL it was fetched from"},
		{"a client_secret", doc("/t", `,"client_secret":"s3cret"`), 200, json, "client_secret"},
		{"a secret-based method", doc("/t", `,"token_endpoint_auth_method":"client_secret_basic"`), 200, json, "must be none"},
		{"a key-based method", doc("/t", `,"token_endpoint_auth_method":"private_key_jwt"`), 200, json, "must be none"},
		{"no redirect_uris", `{"client_id":"` + docs.url("/t") + `"}`, 200, json, "redirect_uris"},
		{"a javascript: redirect URI", `{"client_id":"` + docs.url("/t") + `","redirect_uris":["javascript:alert(1)"]}`, 200, json, "not allowed"},
		{"http off loopback", `{"client_id":"` + docs.url("/t") + `","redirect_uris":["http://evil.example/cb"]}`, 200, json, "plain http"},
		{"grant_types without authorization_code", doc("/t", `,"grant_types":["refresh_token"]`), 200, json, "authorization_code"},
		{"an implicit grant", doc("/t", `,"grant_types":["authorization_code","implicit"]`), 200, json, "grant_types"},
		{"response_types token", doc("/t", `,"response_types":["token"]`), 200, json, "response_types"},
		{"a member twice", doc("/t", `,"grant_types":["authorization_code"],"grant_types":["refresh_token"]`), 200, json, "appears twice"},
		{"no client_name (MCP requires one)", `{"client_id":"` + docs.url("/t") + `","redirect_uris":["http://127.0.0.1/cb"]}`, 200, json, "no client_name"},
		{"a member in other case", doc("/t", `,"Redirect_URIs":["https://evil.example/cb"]`), 200, json, "must be spelled"},
		{"a hidden character in the name", `{"client_id":"` + docs.url("/t") + `","client_name":"Safe\u202eevil","redirect_uris":["http://127.0.0.1/cb"]}`, 200, json, "invisible"},
		{"not JSON", "<html>hello</html>", 200, json, "not a JSON object"},
		{"a JSON array", "[]", 200, json, "not a JSON object"},
		{"not UTF-8", "{\"client_id\":\"\xff\"}", 200, json, "UTF-8"},
		{"served as HTML", doc("/t", ""), 200, http.Header{"Content-Type": {"text/html"}}, "not served as JSON"},
		{"larger than 5 KB", doc("/t", `,"client_name":"`+strings.Repeat("x", 5<<10)+`"`), 200, json, "larger than 5 KB"},
		{"404", "no", 404, nil, "HTTP 404"},
		{"500", "no", 500, nil, "HTTP 500"},
		{"JSON of someone else's, quoted nowhere", `{"client_id":"https://other.example/x","db_password_hunter2":1,"db_password_hunter2":2}`, 200, json, "not the URL it was fetched from"},
		{"a redirect", "", 302, http.Header{"Location": {docs.url("/elsewhere")}}, "redirects are not followed"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := fmt.Sprintf("/rule%d", i)
			body := strings.ReplaceAll(tt.body, docs.url("/t"), docs.url(path))
			docs.answer(path, tt.status, tt.header, body)
			c := &testClient{id: docs.url(path), redirectURI: "http://127.0.0.1/cb", verifier: oauth2.GenerateVerifier()}
			status := http.StatusBadRequest
			if tt.status != 200 {
				status = http.StatusBadGateway
			}
			wantPage(t, c, status, tt.want)
			wantPage(t, c, status, host)
			if logs := env.logs.String(); !strings.Contains(logs, "host="+host) || strings.Contains(logs, "s3cret") || strings.Contains(logs, "hello") || strings.Contains(logs, "hunter2") {
				t.Errorf("the log names no host, or quotes a document")
			}
		})
	}

	t.Run("the redirect URI must be one of the document's; a loopback one on any port", func(t *testing.T) {
		c := docs.publish("/redirects", "")
		c.redirectURI = "https://evil.example/cb"
		wantPage(t, c, http.StatusBadRequest, "Invalid redirect URI")
		for _, u := range []string{"http://127.0.0.1/callback", "http://127.0.0.1:51234/callback"} {
			c.redirectURI = u
			if resp := newBrowser(t).get(t, env.url+c.authorizeURL(nil)); resp.StatusCode != http.StatusOK {
				t.Errorf("GET /authorize with %s = %d, want the consent page", u, resp.StatusCode)
			}
		}
	})
	t.Run("Claude Code's document: portless loopback URIs, a request on a random port", func(t *testing.T) {
		docs.answer("/claude-code-client-metadata", 200, json, `{"client_id":"`+docs.url("/claude-code-client-metadata")+`","client_name":"Claude Code",`+
			`"redirect_uris":["http://localhost/callback","http://127.0.0.1/callback"],"grant_types":["authorization_code","refresh_token"],`+
			`"response_types":["code"],"token_endpoint_auth_method":"none"}`)
		c := &testClient{id: docs.url("/claude-code-client-metadata"), redirectURI: "http://localhost:49152/callback", verifier: oauth2.GenerateVerifier()}
		if tokens := env.signInWith(t, c); tokens.RefreshToken == "" {
			t.Errorf("no refresh token for Claude Code")
		}
	})
	t.Run("the consent page escapes and cuts the name", func(t *testing.T) {
		docs.answer("/named", 200, json, `{"client_id":"`+docs.url("/named")+`","redirect_uris":["http://127.0.0.1/callback"],"client_name":"<script>x</script>`+strings.Repeat("n", 200)+`"}`)
		c := &testClient{id: docs.url("/named"), redirectURI: "http://127.0.0.1/callback", verifier: oauth2.GenerateVerifier()}
		page := readBody(t, newBrowser(t).get(t, env.url+c.authorizeURL(nil)))
		if strings.Contains(page, "<script>") || !strings.Contains(page, "&lt;script&gt;") || strings.Contains(page, strings.Repeat("n", 90)) {
			t.Errorf("consent page shows the name unescaped or uncut:\n%s", page)
		}
	})
	t.Run("a document on loopback warns of nothing", func(t *testing.T) {
		loopbackURL := strings.Replace(docs.url("/local"), "app.example.com", "127.0.0.1", 1)
		docs.answer("/local", 200, json, `{"client_id":"`+loopbackURL+`","client_name":"Local","redirect_uris":["http://127.0.0.1/callback"]}`)
		c := &testClient{id: loopbackURL, redirectURI: "http://127.0.0.1/callback", verifier: oauth2.GenerateVerifier()}
		if page := readBody(t, newBrowser(t).get(t, env.url+c.authorizeURL(nil))); strings.Contains(page, "Warning") {
			t.Errorf("consent page warns of a loopback redirect for a loopback document:\n%s", page)
		}
	})

	t.Run("kept for its max-age, between a minute and a day; failures for a minute", func(t *testing.T) {
		for _, tt := range []struct {
			cacheControl string
			kept         time.Duration
		}{
			{"", 5 * time.Minute},
			{"max-age=600", 10 * time.Minute},
			{"public, max-age=1", time.Minute},
			{"no-store", time.Minute},
			{"no-cache, max-age=600", time.Minute},
			{"max-age=999999", 24 * time.Hour},
		} {
			path := "/ttl" + strconv.Itoa(int(tt.kept/time.Second)) + strings.ReplaceAll(tt.cacheControl, " ", "")
			docs.answer(path, 200, http.Header{"Content-Type": {"application/json"}, "Cache-Control": {tt.cacheControl}}, doc(path, ""))
			c := &testClient{id: docs.url(path), redirectURI: "http://127.0.0.1/callback", verifier: oauth2.GenerateVerifier()}
			before := docs.fetches.Load()
			for _, wait := range []time.Duration{0, tt.kept - time.Second, time.Second} {
				env.clock.advance(wait)
				newBrowser(t).get(t, env.url+c.authorizeURL(nil))
			}
			if got := docs.fetches.Load() - before; got != 2 {
				t.Errorf("Cache-Control %q: %d fetches, want 2: one, and one once %v passed", tt.cacheControl, got, tt.kept)
			}
		}
		docs.answer("/flaky", 503, nil, "")
		c := &testClient{id: docs.url("/flaky"), redirectURI: "http://127.0.0.1/callback", verifier: oauth2.GenerateVerifier()}
		wantPage(t, c, http.StatusBadGateway, "503")
		docs.answer("/flaky", 200, json, doc("/flaky", ""))
		wantPage(t, c, http.StatusBadGateway, "503") // remembered
		env.clock.advance(time.Minute)
		if resp := newBrowser(t).get(t, env.url+c.authorizeURL(nil)); resp.StatusCode != http.StatusOK {
			t.Errorf("GET /authorize a minute after the failure = %d, want the consent page", resp.StatusCode)
		}
	})

	t.Run("a client is kept once approved, not before, and as long as a sign-in needs", func(t *testing.T) {
		c := docs.publish("/approved-late", "")
		for range 50 {
			newBrowser(t).get(t, env.url+c.authorizeURL(nil))
		}
		if _, ok := env.srv.clients.get(c.id); ok {
			t.Fatalf("a document client is kept before anyone approved it")
		}
		// Approved at the end of its first hour, after a consent page left open
		// and a slow sign-in at Entra: it must still be there at /token.
		env.signInWith(t, c)
		env.clock.advance(55 * time.Minute)
		b := newBrowser(t)
		id := consentIDFrom(t, readBody(t, b.get(t, env.url+c.authorizeURL(nil))))
		env.clock.advance(9 * time.Minute)
		entraURL := location(t, b.postForm(t, env.url+"/authorize", url.Values{"consent_id": {id}, "decision": {"approve"}}), http.StatusSeeOther)
		env.clock.advance(9 * time.Minute)
		back := location(t, b.get(t, location(t, b.get(t, entraURL.String()), http.StatusFound).String()), http.StatusFound)
		env.redeem(t, c, back.Query().Get("code"))
	})
	t.Run("the page says what failed, not what the network or the site said", func(t *testing.T) {
		roots := x509.NewCertPool()
		roots.AddCert(docs.Certificate())
		env.srv.documents = newDocumentCache(false, roots, env.clock.now) // loopback refused, as in production
		defer func() { env.srv.documents = docs.cache(env.clock.now) }()
		c := docs.publish("/refused", "")
		c.id = strings.Replace(c.id, "app.example.com", "127.0.0.1", 1)
		resp := newBrowser(t).get(t, env.url+c.authorizeURL(nil))
		page := readBody(t, resp)
		if resp.StatusCode != http.StatusBadGateway || !strings.Contains(page, "the connection failed") {
			t.Errorf("GET /authorize = %d:\n%s", resp.StatusCode, page)
		}
		for _, detail := range []string{"dial", "refused the address", "public one"} {
			if strings.Contains(page, detail) {
				t.Errorf("the page shows the network's error (%q):\n%s", detail, page)
			}
		}
		if !strings.Contains(env.logs.String(), "not a public one") {
			t.Errorf("the log does not say why the connection failed")
		}
	})
	t.Run("/token never fetches: an unknown URL, or one with a secret, is invalid_client", func(t *testing.T) {
		before := docs.fetches.Load()
		c := docs.publish("/never-authorized", "")
		wantOAuthError(t, env.postForm(t, "/token", url.Values{"grant_type": {"authorization_code"}, "code": {"x"}, "client_id": {c.id},
			"code_verifier": {c.verifier}}, nil), http.StatusUnauthorized, "invalid_client")
		tokens := env.signInWith(t, docs.publish("/with-secret", ""))
		wantOAuthError(t, env.postForm(t, "/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {tokens.RefreshToken},
			"client_id": {docs.url("/with-secret")}, "client_secret": {"guess"}}, nil), http.StatusUnauthorized, "invalid_client")
		if got := docs.fetches.Load() - before; got != 1 {
			t.Errorf("%d fetches, want 1 (the sign-in's /authorize)", got)
		}
	})

	t.Run("one client id, many users: each sign-in is its own", func(t *testing.T) {
		c := docs.publish("/shared", "")
		first, second := env.signInWith(t, c), env.signInWith(t, c)
		env.postForm(t, "/revoke", url.Values{"token": {first.RefreshToken}, "client_id": {c.id}}, nil)
		wantOAuthError(t, env.refresh(t, first.RefreshToken, c.id), http.StatusBadRequest, "invalid_grant")
		if resp := env.refresh(t, second.RefreshToken, c.id); resp.StatusCode != http.StatusOK {
			t.Errorf("the other user's refresh = %d, want 200", resp.StatusCode)
		}
	})

	t.Run("one fetch per URL, however many ask at once", func(t *testing.T) {
		started, release := make(chan struct{}), make(chan struct{})
		slow := docs.url("/slow")
		docs.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			docs.fetches.Add(1)
			close(started)
			<-release
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"client_id":"`+slow+`","client_name":"Slow","redirect_uris":["http://127.0.0.1/callback"]}`)
		})
		before := docs.fetches.Load()
		var wg sync.WaitGroup
		results := make(chan error, 10)
		ask := func(requester string) {
			defer wg.Done()
			_, err := env.srv.documents.client(t.Context(), slow, requester)
			results <- err
		}
		wg.Add(1)
		go ask("203.0.113.1")
		<-started // the fetch is in flight: everyone else joins it
		for i := range 9 {
			wg.Add(1)
			go ask(fmt.Sprintf("203.0.113.%d", i+2))
		}
		close(release)
		wg.Wait()
		close(results)
		for err := range results {
			if err != nil {
				t.Error(err)
			}
		}
		if got := docs.fetches.Load() - before; got != 1 {
			t.Errorf("%d fetches, want 1", got)
		}
	})
}

// TestClientMetadataDocumentFetchLimits holds the fetcher to its limits:
// only a few fetches at once, server-wide; addresses that are not public
// refused when connecting, loopback included unless allowed; no proxy.
func TestClientMetadataDocumentFetchLimits(t *testing.T) {
	env := newTestEnv(t)
	docs := env.publishDocuments(t)

	t.Run("two fetches at a time per client address, and a few server-wide", func(t *testing.T) {
		var started sync.WaitGroup
		release := make(chan struct{})
		docs.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			started.Done()
			<-release
			http.NotFound(w, r)
		})
		var done sync.WaitGroup
		started.Add(maxDocumentFetches)
		for i := range maxDocumentFetches {
			done.Add(1)
			go func() {
				defer done.Done()
				// Two from the tests' browsers' address, the others from elsewhere.
				requester := fmt.Sprintf("198.51.100.%d", i)
				if i < fetchesPerAddress {
					requester = clientAddress("127.0.0.1:1")
				}
				env.srv.documents.client(t.Context(), docs.url(fmt.Sprintf("/busy%d", i)), requester)
			}()
		}
		started.Wait()
		c := &testClient{id: docs.url("/one-more"), redirectURI: "http://127.0.0.1/callback", verifier: oauth2.GenerateVerifier()}
		if resp := newBrowser(t).get(t, env.url+c.authorizeURL(nil)); resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("GET /authorize from an address with two fetches in flight = %d, want 503", resp.StatusCode)
		}
		gone, cancel := context.WithCancel(t.Context())
		cancel() // a requester that would wait for a slot, but has left
		if _, err := env.srv.documents.client(gone, docs.url("/one-more"), "192.0.2.1"); err != errDocumentsBusy {
			t.Errorf("a fetch past %d at once = %v, want errDocumentsBusy", maxDocumentFetches, err)
		}
		close(release)
		done.Wait()
	})

	t.Run("loopback refused unless allowed, at the address connected to", func(t *testing.T) {
		roots := x509.NewCertPool()
		roots.AddCert(docs.Certificate())
		strict := newDocumentCache(false, roots, env.clock.now) // as without CLIENT_METADATA_ALLOW_LOOPBACK=1
		target := strings.Replace(docs.url("/x"), "app.example.com", "127.0.0.1", 1)
		before := docs.fetches.Load()
		_, err := strict.client(t.Context(), target, "192.0.2.1")
		var de *documentError
		if !errors.As(err, &de) || de.status != http.StatusBadGateway || !strings.Contains(fmt.Sprint(de.detail), "not a public one") {
			t.Errorf("fetch from loopback = %v (%v), want the address refused", err, de)
		}
		if docs.fetches.Load() != before {
			t.Errorf("the refused fetch reached the server")
		}
	})

	t.Run("no proxy: the address check must see the real target", func(t *testing.T) {
		t.Setenv("HTTPS_PROXY", "http://127.0.0.1:1")
		t.Setenv("https_proxy", "http://127.0.0.1:1")
		docs.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"client_id":"`+docs.url("/direct")+`","client_name":"Direct","redirect_uris":["http://127.0.0.1/callback"]}`)
		})
		if _, err := env.srv.documents.client(t.Context(), docs.url("/direct"), "192.0.2.1"); err != nil {
			t.Errorf("fetch with HTTPS_PROXY set = %v, want it fetched directly", err)
		}
	})

	t.Run("off: not advertised, and a URL client_id is refused without a fetch", func(t *testing.T) {
		off := newTestEnv(t, func(c *config) { c.documents = false })
		var md map[string]any
		off.getJSON(t, "/.well-known/oauth-authorization-server", &md)
		if _, ok := md["client_id_metadata_document_supported"]; ok {
			t.Errorf("metadata advertises client_id_metadata_document_supported while off")
		}
		c := &testClient{id: docs.url("/direct"), redirectURI: "http://127.0.0.1/callback", verifier: oauth2.GenerateVerifier()}
		resp := newBrowser(t).get(t, off.url+c.authorizeURL(nil))
		if page := readBody(t, resp); resp.StatusCode != http.StatusBadRequest || !strings.Contains(page, "CLIENT_METADATA_DOCUMENTS=off") {
			t.Errorf("GET /authorize while off = %d:\n%s", resp.StatusCode, page)
		}
	})
}

// TestPublicAddress is the address check of document fetches, on literals:
// no lookups, no traffic.
func TestPublicAddress(t *testing.T) {
	for _, tt := range []struct {
		ip     string
		public bool
	}{
		{"8.8.8.8", true}, {"1.1.1.1", true}, {"2606:4700:4700::1111", true}, {"20.190.160.1", true},
		{"127.0.0.1", false}, {"127.255.255.254", false}, {"::1", false},
		{"10.1.2.3", false}, {"172.16.0.1", false}, {"172.31.255.255", false}, {"192.168.1.1", false},
		{"169.254.169.254", false}, {"fe80::1", false}, {"fd00::1", false}, {"fc00::1", false},
		{"224.0.0.1", false}, {"239.255.255.250", false}, {"ff02::1", false},
		{"0.0.0.0", false}, {"0.1.2.3", false}, {"::", false},
		{"100.64.0.1", false}, {"100.127.255.255", false}, {"198.18.0.1", false}, {"198.19.255.255", false},
		{"240.0.0.1", false}, {"255.255.255.255", false},
		{"::ffff:127.0.0.1", false}, {"::ffff:8.8.8.8", false}, {"::127.0.0.1", false},
		{"64:ff9b::a9fe:a9fe", false}, {"64:ff9b:1::1", false}, {"2002:7f00:1::", false}, {"2001:0:4136:e378::1", false},
		{"172.15.255.255", true}, {"172.32.0.0", true}, {"100.63.255.255", true}, {"100.128.0.0", true},
		{"fe80::1%eth0", false}, {"fec0::1", false}, {"100::1", false}, {"2001:db8::1", false}, {"3fff::1", false}, {"5f00::1", false},
		{"2001:2::1", false}, {"::ffff:0:a00:1", false}, {"192.0.0.170", false}, {"192.0.2.1", false}, {"203.0.113.5", false},
		{"2001:4860:4860::8888", true}, {"2a00:1450:4001::1", true},
	} {
		if got := publicAddress(netip.MustParseAddr(tt.ip)); got != tt.public {
			t.Errorf("publicAddress(%s) = %v, want %v", tt.ip, got, tt.public)
		}
	}
}

// ---- Step 4: consent ----

func TestAuthorizeErrors(t *testing.T) {
	env := newTestEnv(t)
	c := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	valid := func(edit func(url.Values)) string {
		q := url.Values{"response_type": {"code"}, "client_id": {c.id}, "redirect_uri": {c.redirectURI}, "state": {"st"},
			"code_challenge": {oauth2.S256ChallengeFromVerifier(c.verifier)}, "code_challenge_method": {"S256"}}
		edit(q)
		return "/authorize?" + q.Encode()
	}

	// Before the user has approved the client, every error is a page, never
	// a redirect: first the redirect URI is unvalidated, then it is merely
	// registered, which anyone can do (RFC 9700 §4.11.2).
	for name, edit := range map[string]func(url.Values){
		"unknown client":           func(q url.Values) { q.Set("client_id", "nope") },
		"missing client":           func(q url.Values) { q.Del("client_id") },
		"unregistered redirect":    func(q url.Values) { q.Set("redirect_uri", "https://evil.example/cb") },
		"redirect with more path":  func(q url.Values) { q.Set("redirect_uri", c.redirectURI+"/x") },
		"loopback, other host":     func(q url.Values) { q.Set("redirect_uri", "http://localhost:7777/callback") },
		"loopback with a fragment": func(q url.Values) { q.Set("redirect_uri", "http://127.0.0.1:9999/callback#x") },
		"duplicate parameter":      func(q url.Values) { q.Add("redirect_uri", "https://evil.example/cb") },
		"response_type token":      func(q url.Values) { q.Set("response_type", "token") },
		"no PKCE":                  func(q url.Values) { q.Del("code_challenge"); q.Del("code_challenge_method") },
		"plain PKCE":               func(q url.Values) { q.Set("code_challenge_method", "plain") },
		"malformed challenge":      func(q url.Values) { q.Set("code_challenge", "short") },
		"foreign resource":         func(q url.Values) { q.Set("resource", "https://graph.microsoft.com") },
		"resource with a sub-path": func(q url.Values) { q.Set("resource", env.url+"/sse/x") },
		"resource with userinfo":   func(q url.Values) { q.Set("resource", strings.Replace(env.url, "//", "//evil@", 1)+"/mcp") },
		"resource with a bare ?":   func(q url.Values) { q.Set("resource", env.url+"/mcp?") },
		"resource with a bare #":   func(q url.Values) { q.Set("resource", env.url+"/mcp#") },
	} {
		t.Run(name, func(t *testing.T) {
			resp := newBrowser(t).get(t, env.url+valid(edit))
			if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
				t.Errorf("GET /authorize = %d, Location %q; want a 400 page and no redirect", resp.StatusCode, resp.Header.Get("Location"))
			}
		})
	}

	for name, edit := range map[string]func(url.Values){
		"loopback on another port":        func(q url.Values) { q.Set("redirect_uri", "http://127.0.0.1:9999/callback") },
		"no redirect_uri, one registered": func(q url.Values) { q.Del("redirect_uri") },
		"no state, no scope":              func(q url.Values) { q.Del("state"); q.Del("scope") },
		"resource with a trailing slash":  func(q url.Values) { q.Set("resource", env.url+"/") },
		"resource in upper case":          func(q url.Values) { q.Set("resource", strings.ToUpper(env.url)+"/sse") },
	} {
		t.Run(name, func(t *testing.T) {
			if resp := newBrowser(t).get(t, env.url+valid(edit)); resp.StatusCode != http.StatusOK {
				t.Errorf("GET /authorize = %d, want 200 and the consent page", resp.StatusCode)
			}
		})
	}
}

func TestConsent(t *testing.T) {
	env := newTestEnv(t)
	c := env.newClient(t, `"token_endpoint_auth_method":"none","client_name":"<script>alert(1)</script>"`)

	t.Run("the page escapes the client's name and redirect URI", func(t *testing.T) {
		page := readBody(t, newBrowser(t).get(t, env.url+c.authorizeURL(nil)))
		if strings.Contains(page, "<script>") || !strings.Contains(page, "&lt;script&gt;") {
			t.Errorf("consent page does not escape client_name:\n%s", page)
		}
		reg := env.register(t, `{"token_endpoint_auth_method":"none","redirect_uris":["https://a.example/cb?x=\"><img src=x onerror=alert(1)>"]}`)
		hostile := &testClient{id: reg["client_id"].(string), redirectURI: `https://a.example/cb?x="><img src=x onerror=alert(1)>`, verifier: oauth2.GenerateVerifier()}
		page = readBody(t, newBrowser(t).get(t, env.url+hostile.authorizeURL(nil)))
		if strings.Contains(page, "<img") || !strings.Contains(page, "&#34;&gt;&lt;img") {
			t.Errorf("consent page does not escape the redirect URI:\n%s", page)
		}
	})
	t.Run("deny redirects to the client with access_denied", func(t *testing.T) {
		b := newBrowser(t)
		id := consentIDFrom(t, readBody(t, b.get(t, env.url+c.authorizeURL(nil))))
		u := location(t, b.postForm(t, env.url+"/authorize", url.Values{"consent_id": {id}, "decision": {"deny"}}), http.StatusSeeOther)
		if u.Query().Get("error") != "access_denied" || u.Query().Get("state") != "client-state" || u.Query().Get("iss") != env.url {
			t.Errorf("deny redirected to %s, want error=access_denied, the state and iss", u)
		}
	})

	tests := []struct {
		name       string
		post       func(t *testing.T, b *browser, consentID string) *http.Response
		wantStatus int
	}{
		{"consent id used twice", func(t *testing.T, b *browser, id string) *http.Response {
			b.postForm(t, env.url+"/authorize", url.Values{"consent_id": {id}, "decision": {"approve"}})
			return b.postForm(t, env.url+"/authorize", url.Values{"consent_id": {id}, "decision": {"approve"}})
		}, http.StatusBadRequest},
		{"unknown consent id", func(t *testing.T, b *browser, id string) *http.Response {
			return b.postForm(t, env.url+"/authorize", url.Values{"consent_id": {"forged"}, "decision": {"approve"}})
		}, http.StatusBadRequest},
		{"expired consent id", func(t *testing.T, b *browser, id string) *http.Response {
			env.clock.advance(consentTTL)
			return b.postForm(t, env.url+"/authorize", url.Values{"consent_id": {id}, "decision": {"approve"}})
		}, http.StatusBadRequest},
		{"posted by another browser", func(t *testing.T, b *browser, id string) *http.Response {
			return newBrowser(t).postForm(t, env.url+"/authorize", url.Values{"consent_id": {id}, "decision": {"approve"}})
		}, http.StatusForbidden},
		{"posted from another site", func(t *testing.T, b *browser, id string) *http.Response {
			b.header = http.Header{"Sec-Fetch-Site": {"cross-site"}, "Origin": {"https://evil.example"}}
			return b.postForm(t, env.url+"/authorize", url.Values{"consent_id": {id}, "decision": {"approve"}})
		}, http.StatusForbidden},
		{"no decision", func(t *testing.T, b *browser, id string) *http.Response {
			return b.postForm(t, env.url+"/authorize", url.Values{"consent_id": {id}})
		}, http.StatusBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBrowser(t)
			id := consentIDFrom(t, readBody(t, b.get(t, env.url+c.authorizeURL(nil))))
			resp := tt.post(t, b, id)
			if resp.StatusCode != tt.wantStatus || resp.Header.Get("Location") != "" {
				t.Errorf("POST /authorize = %d (Location %q), want %d and no redirect", resp.StatusCode, resp.Header.Get("Location"), tt.wantStatus)
			}
		})
	}
}

func TestBrowserCookie(t *testing.T) {
	for _, tt := range []struct {
		publicURL, wantName string
		wantSecure          bool
	}{
		{"http://localhost:3001", "entra_mcp_browser", false},
		{"https://mcp.example", "__Host-entra_mcp_browser", true},
	} {
		srv := newServer(config{publicURL: tt.publicURL, sessionKeys: [][]byte{randomBytes(32)}}, slog.New(slog.DiscardHandler), nil, time.Now)
		rec := httptest.NewRecorder()
		srv.browserCookie(rec, httptest.NewRequest("GET", "/authorize", nil))
		cookies := rec.Result().Cookies()
		if len(cookies) != 1 {
			t.Fatalf("%s: cookies = %v", tt.publicURL, cookies)
		}
		c := cookies[0]
		// Lax, not Strict: the callback is a top-level redirect from Entra's
		// site, and must carry the cookie.
		if c.Name != tt.wantName || c.Secure != tt.wantSecure || !c.HttpOnly || c.SameSite != http.SameSiteLaxMode ||
			c.Path != "/" || c.Domain != "" || c.MaxAge < int((consentTTL+flowTTL)/time.Second) {
			t.Errorf("%s: cookie = %+v", tt.publicURL, c)
		}
	}
}

// ---- Steps 5 and 6: sign-in at Entra ID and the callback ----

func TestCallbackErrors(t *testing.T) {
	env := newTestEnv(t)
	c := env.newClient(t, `"token_endpoint_auth_method":"none"`)

	t.Run("unknown state", func(t *testing.T) {
		resp := newBrowser(t).get(t, env.url+"/auth/callback?code=x&state=forged")
		if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" {
			t.Errorf("callback with a forged state = %d, want 400 and no redirect", resp.StatusCode)
		}
	})
	t.Run("state used twice", func(t *testing.T) {
		b := newBrowser(t)
		callback := env.toCallback(t, b, c)
		location(t, b.get(t, callback), http.StatusFound)
		if resp := b.get(t, callback); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("callback replayed = %d, want 400", resp.StatusCode)
		}
	})
	t.Run("state expired", func(t *testing.T) {
		b := newBrowser(t)
		callback := env.toCallback(t, b, c)
		env.clock.advance(flowTTL)
		if resp := b.get(t, callback); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("callback after %v = %d, want 400", flowTTL, resp.StatusCode)
		}
	})
	t.Run("the Entra link opened in another browser", func(t *testing.T) {
		// The attacker approves his own client, then mails the Entra link
		// to a victim, whose browser Entra signs in after an account pick.
		attacker, victim := newBrowser(t), newBrowser(t)
		callback := env.toCallback(t, attacker, c)
		resp := victim.get(t, callback)
		if resp.StatusCode != http.StatusForbidden || resp.Header.Get("Location") != "" {
			t.Errorf("callback in the victim's browser = %d (Location %q), want 403 and no redirect", resp.StatusCode, resp.Header.Get("Location"))
		}
		if resp := attacker.get(t, callback); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("the same callback afterwards = %d, want 400: the state was used up", resp.StatusCode)
		}
	})

	// Entra's errors reach the client as spec-shaped errors, never with
	// Entra's own text; the log gets the AADSTS code, trace id and a hint.
	tests := []struct {
		name      string
		setup     func(f *fakeEntra)
		wantError string
		wantLog   string
	}{
		{"user cancelled", func(f *fakeEntra) { f.set(func() { f.authorizeError = "access_denied" }) }, "access_denied", "aadsts=50126"},
		{"Entra unavailable", func(f *fakeEntra) { f.set(func() { f.authorizeError = "temporarily_unavailable" }) }, "temporarily_unavailable", "trace_id="},
		{"consent required", func(f *fakeEntra) { f.set(func() { f.authorizeError = "consent_required" }) }, "server_error", "hint=\"the app needs consent"},
		{"wrong client secret", func(f *fakeEntra) { f.set(func() { f.clientSecret = "rotated" }) }, "server_error", "aadsts=7000215"},
		{"id_token for another app", func(f *fakeEntra) { f.set(func() { f.idTokenEdit = func(c map[string]any) { c["aud"] = "other" } }) }, "server_error", "audience"},
		{"id_token from another issuer", func(f *fakeEntra) {
			f.set(func() { f.idTokenEdit = func(c map[string]any) { c["iss"] = "https://evil.example/v2.0" } })
		}, "server_error", "issuer"},
		{"id_token with another nonce", func(f *fakeEntra) {
			f.set(func() { f.idTokenEdit = func(c map[string]any) { c["nonce"] = "replayed" } })
		}, "server_error", "nonce"},
		{"id_token not valid yet", func(f *fakeEntra) {
			f.set(func() { f.idTokenEdit = func(c map[string]any) { c["nbf"] = f.now().Add(time.Hour).Unix() } })
		}, "server_error", "not valid yet"},
		{"id_token unsigned (alg none)", func(f *fakeEntra) { f.set(func() { f.idTokenHeader = map[string]any{"alg": "none"} }) }, "server_error", "not RS256"},
		{"id_token with a swapped algorithm", func(f *fakeEntra) { f.set(func() { f.idTokenHeader = map[string]any{"alg": "HS256"} }) }, "server_error", "not RS256"},
		{"id_token signed by another key", func(f *fakeEntra) {
			other, _ := rsa.GenerateKey(rand.Reader, 2048)
			f.set(func() { f.idTokenSigner = other })
		}, "server_error", "bad signature"},
		{"id_token naming an unknown key", func(f *fakeEntra) { f.set(func() { f.idTokenHeader = map[string]any{"kid": "forged"} }) }, "server_error", "unknown key"},
		{"id_token expired", func(f *fakeEntra) {
			f.set(func() { f.idTokenEdit = func(c map[string]any) { c["exp"] = f.now().Add(-time.Hour).Unix() } })
		}, "server_error", "expired"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := newTestEnv(t)
			c := env.newClient(t, `"token_endpoint_auth_method":"none"`)
			b := newBrowser(t)
			tt.setup(env.entra)
			u := location(t, b.get(t, env.toCallback(t, b, c)), http.StatusFound)
			if u.Query().Get("error") != tt.wantError || u.Query().Get("state") != "client-state" || u.Query().Has("code") {
				t.Errorf("callback redirected to %s, want error=%s and the client's state", u, tt.wantError)
			}
			if d := u.Query().Get("error_description"); strings.Contains(d, "AADSTS") {
				t.Errorf("error_description %q passes on Entra's text", d)
			}
			if !strings.Contains(env.logs.String(), tt.wantLog) {
				t.Errorf("log does not mention %q:\n%s", tt.wantLog, env.logs)
			}
		})
	}
}

// TestCertificateFile holds ENTRA_CLIENT_CERTIFICATE to what the server can
// use, each failure one line naming the setting and what to do.
func TestCertificateFile(t *testing.T) {
	keys := testKeys()
	year := time.Now().Add(365 * 24 * time.Hour)
	cert, certPEM := newTestCertificate(t, keys[0], year)
	_, otherPEM := newTestCertificate(t, keys[1], year)
	_, expiredPEM := newTestCertificate(t, keys[0], time.Now().Add(-time.Hour))
	_, futurePEM := newTestCertificate(t, keys[0], time.Now().Add(3*365*24*time.Hour)) // valid from a year on
	small, _ := rsa.GenerateKey(rand.Reader, 1024)
	_, smallPEM := newTestCertificate(t, small, year)
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ecDER, _ := x509.MarshalPKCS8PrivateKey(ec)
	pkcs1 := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(keys[0])})
	certOnly := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
	tests := []struct {
		name, file string
		wantErr    string // "" for a file the server takes
	}{
		{"certificate and PKCS#8 key", string(certPEM), ""},
		{"certificate and PKCS#1 key", string(certOnly) + string(pkcs1), ""},
		{"a chain, the key first, the certificate after another", string(pkcs1) + strings.SplitAfter(string(otherPEM), "-----END CERTIFICATE-----\n")[0] + string(certOnly), ""},
		{"a PFX file", "\x30\x82\x0a\x00binary", "openssl pkcs12"},
		{"an encrypted PKCS#8 key", string(certOnly) + "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n", "openssl pkey"},
		{"an encrypted PKCS#1 key", string(certOnly) + "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00000000000000000000000000000000\n\nAAAA\n-----END RSA PRIVATE KEY-----\n", "openssl pkey"},
		{"no key", string(certOnly), "want the certificate and its private key"},
		{"another certificate's key", string(certOnly) + strings.SplitAfter(string(otherPEM), "-----END CERTIFICATE-----\n")[1], "does not belong"},
		{"an expired certificate", string(expiredPEM), "expired on"},
		{"a certificate not yet valid", string(futurePEM), "valid only from"},
		{"two keys, the second the certificate's", string(certOnly) + strings.SplitAfter(string(otherPEM), "-----END CERTIFICATE-----\n")[1] + string(pkcs1), ""},
		{"a 1024-bit key", string(smallPEM), "2048"},
		{"an EC key", string(certOnly) + string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: ecDER})), "not an RSA key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "cert.pem")
			os.WriteFile(path, []byte(tt.file), 0o600)
			c, err := loadCertificate(path, time.Now())
			switch {
			case tt.wantErr == "" && (err != nil || c.thumbprint != thumbprint(cert)):
				t.Errorf("loadCertificate = %v, %v", c, err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.HasPrefix(err.Error(), "ENTRA_CLIENT_CERTIFICATE") || strings.Contains(err.Error(), "\n")):
				t.Errorf("loadCertificate = %v, want one line saying %q", err, tt.wantErr)
			}
		})
	}
	t.Run("an unreadable file", func(t *testing.T) {
		if _, err := loadCertificate(filepath.Join(t.TempDir(), "none.pem"), time.Now()); err == nil || !strings.Contains(err.Error(), "no such file") {
			t.Errorf("loadCertificate = %v", err)
		}
	})
	t.Run("a certificate that expires within 30 days is a warning at start", func(t *testing.T) {
		for days, want := range map[int]bool{10: true, 60: false} {
			_, file := newTestCertificate(t, keys[0], time.Now().Add(time.Duration(days)*24*time.Hour))
			path := filepath.Join(t.TempDir(), "cert.pem")
			os.WriteFile(path, file, 0o600)
			c, err := loadCertificate(path, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			logConfigNotes(slog.New(slog.NewTextHandler(&logs, nil)), config{certificate: c, accessTTL: time.Hour})
			if got := strings.Contains(logs.String(), "level=WARN msg=\"ENTRA_CLIENT_CERTIFICATE expires within 30 days"); got != want {
				t.Errorf("%d days left: warned %v, want %v: %s", days, got, want, logs.String())
			}
		}
	})
}

// TestClientAssertionsRefused: the fake Entra ID refuses what Entra refuses,
// and the server logs the code with a hint, never the assertion.
func TestClientAssertionsRefused(t *testing.T) {
	env, _ := newCertificateEnv(t)
	f := env.entra
	keys := testKeys()
	tokenPath := "/" + f.tenantID + "/oauth2/v2.0/token"
	aud := f.URL + tokenPath
	now := f.now()
	certificate := func(alg string, edit func(h, c map[string]any)) string {
		h := map[string]any{"alg": alg, "typ": "JWT", "x5t#S256": thumbprint(env.cfg.certificate.cert)}
		c := map[string]any{"aud": aud, "iss": f.clientID, "sub": f.clientID, "jti": rand.Text(), "nbf": now.Unix(), "exp": now.Add(5 * time.Minute).Unix()}
		if edit != nil {
			edit(h, c)
		}
		return signJWT(t, keys[0], h, c)
	}
	issuer := &fakeIssuer{key: keys[1], url: "https://issuer.example", subject: "system:serviceaccount:mcp:entra-mcp"}
	f.set(func() {
		f.federation = &fakeFederation{issuer: issuer.url, subject: issuer.subject, key: &keys[1].PublicKey}
	})
	federated := func(edit func(c map[string]any)) string {
		c := map[string]any{"aud": "api://AzureADTokenExchange", "iss": issuer.url, "sub": issuer.subject, "jti": "same", "exp": now.Add(time.Hour).Unix()}
		if edit != nil {
			edit(c)
		}
		return signJWT(t, issuer.key, map[string]any{"alg": "RS256", "typ": "JWT"}, c)
	}
	reused := certificate("PS256", nil)
	tests := []struct {
		name      string
		assertion string
		want      int // AADSTS code; 0 accepted
	}{
		{"PS256", certificate("PS256", nil), 0},
		{"RS256, which Entra still takes", certificate("RS256", nil), 0},
		{"a jti once", reused, 0},
		{"the same jti again", reused, 700027},
		{"PSS with a longer salt", signPSSMaxSalt(t, keys[0], certificate("PS256", nil)), 700027},
		{"another certificate's thumbprint", certificate("PS256", func(h, _ map[string]any) { h["x5t#S256"] = "AAAA" }), 700027},
		{"no alg it knows", certificate("HS256", nil), 700027},
		{"for another endpoint", certificate("PS256", func(_, c map[string]any) { c["aud"] = "https://login.microsoftonline.com/common/oauth2/v2.0/token" }), 700023},
		{"sub is not the app", certificate("PS256", func(_, c map[string]any) { c["sub"] = "someone" }), 700021},
		{"expired", certificate("PS256", func(_, c map[string]any) { c["exp"] = now.Add(-time.Minute).Unix() }), 700024},
		{"not yet valid", certificate("PS256", func(_, c map[string]any) { c["nbf"] = now.Add(time.Hour).Unix() }), 700024},
		{"federated", federated(nil), 0},
		{"federated, the same token again", federated(nil), 0},
		{"federated, another issuer", federated(func(c map[string]any) { c["iss"] = "https://evil.example" }), 700211},
		{"federated, another audience", federated(func(c map[string]any) { c["aud"] = f.clientID }), 700212},
		{"federated, another subject", federated(func(c map[string]any) { c["sub"] = "system:serviceaccount:other:x" }), 700213},
		{"federated, expired", federated(func(c map[string]any) { c["exp"] = now.Add(-time.Minute).Unix() }), 700024},
		{"federated, signed by someone else", signJWT(t, keys[0], map[string]any{"alg": "RS256"}, map[string]any{"iss": issuer.url, "sub": issuer.subject, "aud": "api://AzureADTokenExchange", "exp": now.Add(time.Hour).Unix()}), 700027},
		{"not a JWT", "abc", 50027},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f.mu.Lock()
			got, _ := f.checkAssertion("urn:ietf:params:oauth:client-assertion-type:jwt-bearer", tt.assertion, tokenPath)
			f.mu.Unlock()
			if got != tt.want {
				t.Errorf("AADSTS%d, want %d", got, tt.want)
			}
		})
	}

	t.Run("a secret and an assertion together, or neither", func(t *testing.T) {
		for name, form := range map[string]url.Values{
			"both":    {"client_secret": {f.clientSecret}, "client_assertion": {certificate("PS256", nil)}, "client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}},
			"neither": {},
		} {
			form.Set("grant_type", "refresh_token")
			form.Set("client_id", f.clientID)
			form.Set("refresh_token", "x")
			resp, err := http.PostForm(aud, form)
			if err != nil {
				t.Fatal(err)
			}
			if body := readBody(t, resp); resp.StatusCode/100 != 4 || (name == "neither" && !strings.Contains(body, "7000218")) {
				t.Errorf("%s: %d %s", name, resp.StatusCode, body)
			}
		}
	})
	t.Run("Entra refuses the certificate: the log says why, and quotes no assertion", func(t *testing.T) {
		other, _ := newTestCertificate(t, keys[1], time.Now().Add(time.Hour))
		f.set(func() { f.certificate = other })
		c := env.newClient(t, `"token_endpoint_auth_method":"none"`)
		b := newBrowser(t)
		location(t, b.get(t, env.toCallback(t, b, c)), http.StatusFound)
		logs := env.logs.String()
		if !strings.Contains(logs, "aadsts=700027") || !strings.Contains(logs, "upload the certificate") || strings.Contains(logs, "eyJ") {
			t.Errorf("log:\n%s", logs)
		}
	})
}

func TestEntraKeyRotation(t *testing.T) {
	env := newTestEnv(t)
	env.entra.rotateKey(t)
	env.clock.advance(time.Minute) // the keys were fetched at start: a minute must pass
	env.signIn(t, signInOptions{}) // signed with a key the server has not seen: it fetches the keys again
	fetches := func() int {
		env.entra.mu.Lock()
		defer env.entra.mu.Unlock()
		return env.entra.jwksFetches
	}
	if n := fetches(); n != 2 {
		t.Errorf("the key set was fetched %d times, want 2: at start, and for the new key", n)
	}

	// Forged key ids do not make the server hammer Entra: once a minute.
	env.entra.set(func() { env.entra.idTokenHeader = map[string]any{"kid": "forged"} })
	c := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	for range 3 {
		b := newBrowser(t)
		location(t, b.get(t, env.toCallback(t, b, c)), http.StatusFound)
	}
	if n := fetches(); n != 2 {
		t.Errorf("the key set was fetched %d times, want still 2 within the minute", n)
	}
	env.clock.advance(time.Minute)
	b := newBrowser(t)
	location(t, b.get(t, env.toCallback(t, b, c)), http.StatusFound)
	if n := fetches(); n != 3 {
		t.Errorf("the key set was fetched %d times, want 3 a minute later", n)
	}

	// A fetch that fails keeps the known keys, and does not count against
	// the minute.
	env.entra.set(func() { env.entra.idTokenHeader = nil; env.entra.jwksDown = true })
	env.clock.advance(24 * time.Hour) // the keys are a day old: time to fetch them again
	env.signIn(t, signInOptions{})    // Entra is down: the known key still works
	env.entra.rotateKey(t)
	b, c = newBrowser(t), env.newClient(t, `"token_endpoint_auth_method":"none"`)
	if u := location(t, b.get(t, env.toCallback(t, b, c)), http.StatusFound); u.Query().Has("code") {
		t.Errorf("a sign-in with a key nobody could fetch succeeded")
	}
	env.entra.set(func() { env.entra.jwksDown = false })
	env.signIn(t, signInOptions{}) // at once: the failed fetches did not start the minute
}

func TestAllowedTenants(t *testing.T) {
	tests := []struct {
		name      string
		tenant    string
		allowed   []string
		wantError string // the error the client gets; "" for a sign-in
	}{
		{"the configured tenant, by id", "", nil, ""},
		{"the configured tenant, by domain name", fakeTenantDomain, nil, ""},
		{"organizations, with the tenant allowed", "organizations", []string{"11111111-1111-1111-1111-111111111111"}, ""},
		{"organizations, with everyone allowed", "common", []string{"*"}, ""},
		{"another tenant only", "organizations", []string{"99999999-9999-9999-9999-999999999999"}, "access_denied"},
		{"a token whose tid and iss disagree", "organizations", []string{"*"}, "server_error"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := newTestEnv(t, func(c *config) {
				c.tenantID = cmp.Or(tt.tenant, c.tenantID)
				c.allowedTenants = tt.allowed
			})
			if tt.name == "a token whose tid and iss disagree" {
				env.entra.set(func() {
					env.entra.idTokenEdit = func(c map[string]any) { c["tid"] = "99999999-9999-9999-9999-999999999999" } // iss still names the home tenant
				})
			}
			c := env.newClient(t, `"token_endpoint_auth_method":"none"`)
			b := newBrowser(t)
			u := location(t, b.get(t, env.toCallback(t, b, c)), http.StatusFound)
			if got := u.Query().Get("error"); got != tt.wantError || (tt.wantError == "") != u.Query().Has("code") {
				t.Errorf("callback redirected to %s, want error %q", u, tt.wantError)
			}
		})
	}
	t.Run("organizations without ALLOWED_TENANTS does not start", func(t *testing.T) {
		f := newFakeEntra(t, fakeEntraOptions{redirectURI: "http://localhost:3001/auth/callback"})
		_, err := discoverEntra(t.Context(), config{tenantID: "organizations", authority: f.URL}, &http.Client{Timeout: 10 * time.Second}, time.Now)
		if err == nil || !strings.Contains(err.Error(), "ALLOWED_TENANTS") {
			t.Errorf("discoverEntra = %v, want an error naming ALLOWED_TENANTS", err)
		}
	})
}

// ---- Step 7: tokens ----

func TestTokenErrors(t *testing.T) {
	env := newTestEnv(t)
	pub := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	other := env.newClient(t, `"token_endpoint_auth_method":"none"`)

	// code returns a fresh code for pub, and the token form that redeems it.
	code := func(t *testing.T) url.Values {
		return url.Values{"grant_type": {"authorization_code"}, "code": {env.codeFor(t, pub)}, "redirect_uri": {pub.redirectURI},
			"client_id": {pub.id}, "code_verifier": {pub.verifier}}
	}
	tests := []struct {
		name       string
		form       func(t *testing.T) url.Values
		wantStatus int
		wantError  string
	}{
		{"wrong verifier", func(t *testing.T) url.Values {
			f := code(t)
			f.Set("code_verifier", oauth2.GenerateVerifier())
			return f
		}, 400, "invalid_grant"},
		{"no verifier", func(t *testing.T) url.Values { f := code(t); f.Del("code_verifier"); return f }, 400, "invalid_grant"},
		{"wrong redirect_uri", func(t *testing.T) url.Values {
			f := code(t)
			f.Set("redirect_uri", "http://127.0.0.1:7777/other")
			return f
		}, 400, "invalid_grant"},
		{"another client's code", func(t *testing.T) url.Values { f := code(t); f.Set("client_id", other.id); return f }, 400, "invalid_grant"},
		{"unknown code", func(t *testing.T) url.Values { f := code(t); f.Set("code", "forged"); return f }, 400, "invalid_grant"},
		{"expired code", func(t *testing.T) url.Values { f := code(t); env.clock.advance(codeTTL); return f }, 400, "invalid_grant"},
		{"another server's resource", func(t *testing.T) url.Values { f := code(t); f.Set("resource", "https://evil.example"); return f }, 400, "invalid_target"},
		{"unknown client", func(t *testing.T) url.Values { f := code(t); f.Set("client_id", "nope"); return f }, 401, "invalid_client"},
		{"no grant_type", func(t *testing.T) url.Values { f := code(t); f.Del("grant_type"); return f }, 400, "invalid_request"},
		{"password grant", func(t *testing.T) url.Values { f := code(t); f.Set("grant_type", "password"); return f }, 400, "unsupported_grant_type"},
		{"public client sends a secret", func(t *testing.T) url.Values { f := code(t); f.Set("client_secret", "x"); return f }, 401, "invalid_client"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantOAuthError(t, env.postForm(t, "/token", tt.form(t), nil), tt.wantStatus, tt.wantError)
		})
	}

	t.Run("another client's attempt leaves the code to its owner", func(t *testing.T) {
		form := code(t)
		stolen := maps.Clone(form)
		stolen.Set("client_id", other.id)
		wantOAuthError(t, env.postForm(t, "/token", stolen, nil), 400, "invalid_grant")
		var tokens tokenResponse
		decodeJSON(t, env.postForm(t, "/token", form, nil), http.StatusOK, &tokens)
	})

	t.Run("a code presented without its verifier stays good for its owner", func(t *testing.T) {
		form := code(t)
		for _, edit := range []func(url.Values){
			func(f url.Values) { f.Set("code_verifier", oauth2.GenerateVerifier()) },
			func(f url.Values) { f.Del("code_verifier") },
			func(f url.Values) { f.Set("redirect_uri", "http://127.0.0.1:7777/other") },
			func(f url.Values) { f.Set("resource", "https://evil.example") },
		} {
			leaked := maps.Clone(form)
			edit(leaked)
			if resp := env.postForm(t, "/token", leaked, nil); resp.StatusCode != http.StatusBadRequest {
				t.Errorf("POST /token with the leaked code = %d, want 400", resp.StatusCode)
			}
		}
		var tokens tokenResponse
		decodeJSON(t, env.postForm(t, "/token", form, nil), http.StatusOK, &tokens)
		if resp := env.do(t, "GET", "/sse", nil, bearer(tokens.AccessToken)); resp.StatusCode != http.StatusOK {
			t.Errorf("GET /sse with the owner's token = %d, want 200", resp.StatusCode)
		}
	})

	t.Run("code used twice ends the session the first use created", func(t *testing.T) {
		form := code(t)
		var tokens tokenResponse
		decodeJSON(t, env.postForm(t, "/token", form, nil), http.StatusOK, &tokens)
		wantOAuthError(t, env.postForm(t, "/token", form, nil), 400, "invalid_grant")
		if resp := env.do(t, "GET", "/sse", nil, bearer(tokens.AccessToken)); resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET /sse with the first use's token = %d, want 401", resp.StatusCode)
		}
	})
}

func TestConfidentialClients(t *testing.T) {
	env := newTestEnv(t)
	for _, method := range []string{"client_secret_basic", "client_secret_post"} {
		c := env.newClient(t, `"token_endpoint_auth_method":"`+method+`"`)
		redeem := func(useBasic bool, secret string) *http.Response {
			form := url.Values{"grant_type": {"authorization_code"}, "code": {env.codeFor(t, c)},
				"redirect_uri": {c.redirectURI}, "code_verifier": {c.verifier}}
			h := http.Header{}
			if useBasic {
				h.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(url.QueryEscape(c.id)+":"+url.QueryEscape(secret))))
			} else {
				form.Set("client_id", c.id)
				form.Set("client_secret", secret)
			}
			return env.postForm(t, "/token", form, h)
		}
		for _, basic := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s, sent by Basic=%v", method, basic), func(t *testing.T) {
				for _, secret := range []string{"wrong", ""} {
					resp := redeem(basic, secret)
					wantOAuthError(t, resp, 401, "invalid_client")
					if got := resp.Header.Get("WWW-Authenticate"); basic != strings.HasPrefix(got, "Basic") {
						t.Errorf("WWW-Authenticate = %q after Basic=%v", got, basic)
					}
				}
				var tokens tokenResponse
				decodeJSON(t, redeem(basic, c.secret), http.StatusOK, &tokens)
			})
		}
	}
}

// ---- Steps 8 and 9: MCP sessions and messages ----

func TestSSESessions(t *testing.T) {
	env := newTestEnv(t)
	alice := env.signIn(t, signInOptions{})
	env.entra.set(func() {
		env.entra.user = fakeUser{oid: "22222222-2222-2222-2222-222222222222", name: "Bob", upn: "bob@contoso.example"}
	})
	bob := env.signIn(t, signInOptions{})
	aliceConn := env.connect(t, alice.AccessToken)
	bobConn := env.connect(t, bob.AccessToken)

	t.Run("each stream gets its own answers", func(t *testing.T) {
		var a, b toolResult
		aliceConn.call(t, "tools/call", `{"name":"getUserDetails"}`, &a)
		bobConn.call(t, "tools/call", `{"name":"getUserDetails"}`, &b)
		if !strings.Contains(a.Content[0].Text, "Adele Vance") || !strings.Contains(b.Content[0].Text, "Bob") {
			t.Errorf("alice got %q, bob got %q", a.Content[0].Text, b.Content[0].Text)
		}
	})

	tests := []struct {
		name        string
		token, path string
		contentType string
		wantStatus  int
	}{
		{"another user's session", bob.AccessToken, aliceConn.endpoint, "application/json", http.StatusNotFound},
		{"unknown session", alice.AccessToken, "/message?sessionId=nope", "application/json", http.StatusNotFound},
		{"no session id", alice.AccessToken, "/message", "application/json", http.StatusBadRequest},
		{"not JSON", alice.AccessToken, aliceConn.endpoint, "text/plain", http.StatusUnsupportedMediaType},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := env.do(t, "POST", tt.path, strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`),
				http.Header{"Authorization": {"Bearer " + tt.token}, "Content-Type": {tt.contentType}})
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("POST %s = %d, want %d", tt.path, resp.StatusCode, tt.wantStatus)
			}
		})
	}

	t.Run("a closed stream ends its session", func(t *testing.T) {
		ms, ok := env.srv.mcp.get(strings.TrimPrefix(aliceConn.endpoint, "/message?sessionId="))
		if !ok {
			t.Fatal("alice's session is not registered")
		}
		aliceConn.close()
		<-ms.stream.done // the handler has returned and unregistered the session
		if resp := aliceConn.post(t, `{"jsonrpc":"2.0","id":1,"method":"ping"}`); resp.StatusCode != http.StatusNotFound {
			t.Errorf("POST to a closed stream's session = %d, want 404", resp.StatusCode)
		}
	})

	t.Run("revoking the session closes its stream", func(t *testing.T) {
		resp := env.postForm(t, "/revoke", url.Values{"token": {bob.AccessToken}, "client_id": {bob.clientID}}, nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("revoke = %d", resp.StatusCode)
		}
		if _, err := bobConn.events.next(); !errors.Is(err, io.EOF) {
			t.Errorf("bob's stream after revocation: %v, want EOF", err)
		}
	})
}

func TestSSEKeepAlive(t *testing.T) {
	env := newTestEnv(t)
	env.srv.keepAlive = time.Millisecond
	tokens := env.signIn(t, signInOptions{})
	conn := env.connect(t, tokens.AccessToken)
	line, err := conn.events.r.ReadString('\n')
	if err != nil || line != ": keep-alive\n" {
		t.Errorf("next line = %q, %v; want a keep-alive comment", line, err)
	}
}

func TestStreamableHTTPErrors(t *testing.T) {
	env := newTestEnv(t, func(c *config) { c.allowedOrigins = []string{"https://app.example"} })
	alice := env.signIn(t, signInOptions{resource: env.url + "/mcp"})
	bob := env.signIn(t, signInOptions{})
	a := &mcpClient{env: env, token: alice.AccessToken}
	a.initialize(t, "2025-11-25")
	b := &mcpClient{env: env, token: bob.AccessToken}
	b.initialize(t, "2025-11-25")
	sse := env.connect(t, bob.AccessToken) // bob's token is for the whole server
	sseID := strings.TrimPrefix(sse.endpoint, "/message?sessionId=")
	ping := `{"jsonrpc":"2.0","id":1,"method":"ping"}`

	tests := []struct {
		name       string
		client     *mcpClient
		method     string
		body       string
		header     http.Header // added to, or replacing, the client's headers
		wantStatus int
		wantCode   int // JSON-RPC error code in the body, if any
	}{
		{"ping", a, "POST", ping, nil, 200, 0},
		{"no Accept header", a, "POST", ping, http.Header{"Accept": nil}, 200, 0},
		{"Accept */*", a, "POST", ping, http.Header{"Accept": {"*/*"}}, 200, 0},
		{"Accept application/*", a, "POST", ping, http.Header{"Accept": {"application/*"}}, 200, 0},
		{"Accept JSON only", a, "POST", ping, http.Header{"Accept": {"application/json"}}, 406, codeInvalidRequest},
		{"Accept events only", a, "POST", ping, http.Header{"Accept": {"text/event-stream"}}, 406, codeInvalidRequest},
		{"Accept refusing JSON", a, "POST", ping, http.Header{"Accept": {"application/json;q=0, text/event-stream"}}, 406, codeInvalidRequest},
		{"empty Accept", a, "POST", ping, http.Header{"Accept": {""}}, 200, 0},
		{"not JSON", a, "POST", ping, http.Header{"Content-Type": {"text/plain"}}, 415, codeInvalidRequest},
		{"no session id", a, "POST", ping, http.Header{"Mcp-Session-Id": nil}, 400, codeInvalidRequest},
		{"unknown session id", a, "POST", ping, http.Header{"Mcp-Session-Id": {"nope"}}, 404, codeSessionNotFound},
		{"another user's session", b, "POST", ping, http.Header{"Mcp-Session-Id": {a.sessionID}}, 404, codeSessionNotFound},
		{"an HTTP+SSE session id", b, "POST", ping, http.Header{"Mcp-Session-Id": {sseID}}, 404, codeSessionNotFound},
		{"initialize again", a, "POST", `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}`, nil, 400, codeInvalidRequest},
		{"initialize with an unknown session id", a, "POST", `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}`,
			http.Header{"Mcp-Session-Id": {"ended"}}, 404, codeSessionNotFound},
		{"no version header", a, "POST", ping, http.Header{"Mcp-Protocol-Version": nil}, 200, 0},
		{"unsupported version header", a, "POST", ping, http.Header{"Mcp-Protocol-Version": {"1999-01-01"}}, 400, codeInvalidRequest},
		{"2026-07-28 request without _meta", a, "POST", `{"jsonrpc":"2.0","id":1,"method":"server/discover","params":{}}`,
			http.Header{"Mcp-Protocol-Version": {"2026-07-28"}, "Mcp-Session-Id": nil, "Mcp-Method": {"server/discover"}}, 400, codeInvalidParams},
		{"2026-07-28 probe without a token", a, "POST", `{"jsonrpc":"2.0","id":1,"method":"server/discover"}`,
			http.Header{"Mcp-Protocol-Version": {"2026-07-28"}, "Authorization": nil}, 401, 0},
		{"batch outside 2025-03-26", a, "POST", "[" + ping + "]", nil, 400, codeInvalidRequest},
		{"notification", a, "POST", `{"jsonrpc":"2.0","method":"notifications/progress"}`, nil, 202, 0},
		{"client response", a, "POST", `{"jsonrpc":"2.0","id":5,"result":{}}`, nil, 202, 0},
		{"GET", a, "GET", "", nil, 405, codeInvalidRequest},
		{"PUT", a, "PUT", ping, nil, 405, codeInvalidRequest},
		{"GET without a token", a, "GET", "", http.Header{"Authorization": nil}, 401, 0},
		{"DELETE without a session id", a, "DELETE", "", http.Header{"Mcp-Session-Id": nil}, 400, codeInvalidRequest},
		{"DELETE another user's session", b, "DELETE", "", http.Header{"Mcp-Session-Id": {a.sessionID}}, 404, codeSessionNotFound},
		{"DELETE an HTTP+SSE session", b, "DELETE", "", http.Header{"Mcp-Session-Id": {sseID}}, 404, codeSessionNotFound},
		{"DELETE with an unsupported version", a, "DELETE", "", http.Header{"Mcp-Protocol-Version": {"1999-01-01"}}, 400, codeInvalidRequest},
		{"a token for /sse", a, "POST", ping, bearer(env.signIn(t, signInOptions{resource: env.url + "/sse"}).AccessToken), 401, 0},
		{"foreign Origin", a, "POST", ping, http.Header{"Origin": {"https://evil.example"}}, 403, codeInvalidRequest},
		{"null Origin", a, "POST", ping, http.Header{"Origin": {"null"}}, 403, codeInvalidRequest},
		{"GET from a foreign Origin", a, "GET", "", http.Header{"Origin": {"https://evil.example"}}, 403, codeInvalidRequest},
		{"DELETE from a foreign Origin", a, "DELETE", "", http.Header{"Origin": {"https://evil.example"}}, 403, codeInvalidRequest},
		{"a lookalike loopback Origin", a, "POST", ping, http.Header{"Origin": {"http://127.0.0.1.evil.example"}}, 403, codeInvalidRequest},
		{"loopback Origin", a, "POST", ping, http.Header{"Origin": {"http://localhost:6274"}}, 200, 0},
		{"our own Origin", a, "POST", ping, http.Header{"Origin": {env.url}}, 200, 0},
		{"an allowed Origin", a, "POST", ping, http.Header{"Origin": {"https://app.example"}}, 200, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := env.do(t, tt.method, "/mcp", strings.NewReader(tt.body), tt.client.headers(tt.header))
			body := readBody(t, resp)
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("%s /mcp = %d, want %d: %s", tt.method, resp.StatusCode, tt.wantStatus, body)
			}
			if tt.wantCode != 0 {
				var r rpcReply
				if err := json.Unmarshal([]byte(body), &r); err != nil || r.Error == nil || r.Error.Code != tt.wantCode {
					t.Errorf("%s /mcp body = %s, want JSON-RPC error %d", tt.method, body, tt.wantCode)
				}
			}
			if resp.StatusCode == http.StatusMethodNotAllowed && resp.Header.Get("Allow") != "POST, DELETE" {
				t.Errorf("Allow = %q", resp.Header.Get("Allow"))
			}
		})
	}

	t.Run("the version error lists the supported versions", func(t *testing.T) {
		resp := env.do(t, "POST", "/mcp", strings.NewReader(ping), a.headers(http.Header{"Mcp-Protocol-Version": {"2026-07-28"}}))
		if body := readBody(t, resp); !strings.Contains(body, "2025-11-25, 2025-06-18, 2025-03-26, 2024-11-05") || strings.Contains(body, "-32022") {
			t.Errorf("body = %s", body)
		}
	})
	t.Run("a Streamable HTTP session id on /message", func(t *testing.T) {
		resp := env.do(t, "POST", "/message?sessionId="+b.sessionID, strings.NewReader(ping), bearer(bob.AccessToken))
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("POST /message with a Streamable HTTP session id = %d, want 404", resp.StatusCode)
		}
		if resp := sse.post(t, `{"jsonrpc":"2.0","method":"notifications/initialized"}`); resp.StatusCode != http.StatusAccepted {
			t.Errorf("the SSE session afterwards = %d, want 202: still alive", resp.StatusCode)
		}
	})
	t.Run("Origin is checked on /sse and /message too", func(t *testing.T) {
		evil := http.Header{"Origin": {"https://evil.example"}, "Authorization": {"Bearer " + bob.AccessToken}}
		for _, r := range []struct{ method, path string }{{"GET", "/sse"}, {"POST", sse.endpoint}} {
			if resp := env.do(t, r.method, r.path, strings.NewReader(ping), evil); resp.StatusCode != http.StatusForbidden {
				t.Errorf("%s %s from a foreign Origin = %d, want 403", r.method, r.path, resp.StatusCode)
			}
		}
	})
}

// TestModernRequests holds MCP 2026-07-28 requests to the rules of
// "Server Validation" and "Versioning", and keeps the eras apart.
func TestModernRequests(t *testing.T) {
	env := newTestEnv(t)
	c := &modernClient{env: env, token: env.signIn(t, signInOptions{}).AccessToken}
	legacy := &mcpClient{env: env, token: c.token}
	legacy.initialize(t, "2025-11-25")
	meta := func(version string) string {
		return `"_meta":{"io.modelcontextprotocol/protocolVersion":"` + version + `","io.modelcontextprotocol/clientCapabilities":{}}`
	}
	call := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"getUserDetails","arguments":{},` + meta("2026-07-28") + `}}`
	tests := []struct {
		name       string
		body       string // "" for the client's own request of method
		method     string
		header     http.Header
		wantStatus int
		wantCode   int
	}{
		{"server/discover", "", "server/discover", nil, 200, 0},
		{"ping is gone", "", "ping", nil, 404, codeMethodNotFound},
		{"initialize is not a 2026-07-28 method", "", "initialize", nil, 404, codeMethodNotFound},
		{"unknown method", "", "resources/list", nil, 404, codeMethodNotFound},
		{"unknown tool", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"nope",` + meta("2026-07-28") + `}}`,
			"tools/call", http.Header{"Mcp-Name": {"nope"}}, 200, codeInvalidParams},
		{"no version header", "", "tools/list", http.Header{"Mcp-Protocol-Version": nil}, 400, codeHeaderMismatch},
		{"version header and _meta disagree", "", "tools/list", http.Header{"Mcp-Protocol-Version": {"2025-11-25"}}, 400, codeHeaderMismatch},
		{"no protocol version in _meta", `{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/clientCapabilities":{}}}}`,
			"tools/list", nil, 400, codeInvalidParams},
		{"no client capabilities in _meta", `{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}`,
			"tools/list", nil, 400, codeInvalidParams},
		{"unsupported version", `{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{` + meta("2099-01-01") + `}}`,
			"tools/list", http.Header{"Mcp-Protocol-Version": {"2099-01-01"}}, 400, codeUnsupportedVersion},
		{"a legacy version in _meta", `{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{` + meta("2025-11-25") + `}}`,
			"tools/list", http.Header{"Mcp-Protocol-Version": {"2025-11-25"}}, 400, codeUnsupportedVersion},
		{"no Mcp-Method", "", "tools/list", http.Header{"Mcp-Method": nil}, 400, codeHeaderMismatch},
		{"Mcp-Method says otherwise", "", "tools/list", http.Header{"Mcp-Method": {"tools/call"}}, 400, codeHeaderMismatch},
		{"no Mcp-Name", call, "tools/call", http.Header{"Mcp-Name": nil}, 400, codeHeaderMismatch},
		{"Mcp-Name says otherwise", call, "tools/call", http.Header{"Mcp-Name": {"deleteEverything"}}, 400, codeHeaderMismatch},
		{"Mcp-Name in base64", call, "tools/call", http.Header{"Mcp-Name": {"=?base64?" + base64.StdEncoding.EncodeToString([]byte("getUserDetails")) + "?="}}, 200, 0},
		{"Mcp-Name in broken base64", call, "tools/call", http.Header{"Mcp-Name": {"=?base64?Z2V0VXNlckRldGFpbHM?="}}, 400, codeHeaderMismatch},
		{"Mcp-Method twice", "", "tools/list", http.Header{"Mcp-Method": {"tools/list", "tools/call"}}, 400, codeHeaderMismatch},
		{"MCP-Protocol-Version twice", "", "tools/list", http.Header{"Mcp-Protocol-Version": {"2026-07-28", "2026-07-28"}}, 400, codeHeaderMismatch},
		{"Mcp-Name twice", call, "tools/call", http.Header{"Mcp-Name": {"getUserDetails", "getUserDetails"}}, 400, codeHeaderMismatch},
		{"Mcp-Method in base64, which only Mcp-Name may be", "", "tools/list", http.Header{"Mcp-Method": {"=?base64?" + base64.StdEncoding.EncodeToString([]byte("tools/list")) + "?="}}, 400, codeHeaderMismatch},
		{"MCP-Protocol-Version in base64", "", "tools/list", http.Header{"Mcp-Protocol-Version": {"=?base64?" + base64.StdEncoding.EncodeToString([]byte("2026-07-28")) + "?="}}, 400, codeHeaderMismatch},
		{"Mcp-Name not ASCII, not encoded", call, "tools/call", http.Header{"Mcp-Name": {"getUserDetails\x80"}}, 400, codeHeaderMismatch},
		{"a notification", `{"jsonrpc":"2.0","method":"notifications/cancelled","params":{}}`, "", nil, 202, 0},
		{"a response", `{"jsonrpc":"2.0","id":3,"result":{}}`, "", nil, 400, codeInvalidRequest},
		{"an Mcp-Session-Id is ignored", "", "tools/list", http.Header{"Mcp-Session-Id": {legacy.sessionID}}, 200, 0},
		{"without a token", "", "server/discover", http.Header{"Authorization": nil}, 401, 0},
		{"a token for /sse", "", "server/discover", bearer(env.signIn(t, signInOptions{resource: env.url + "/sse"}).AccessToken), 401, 0},
		{"foreign Origin", "", "server/discover", http.Header{"Origin": {"https://evil.example"}}, 403, codeInvalidRequest},
		{"GET", "GET", "", nil, 405, codeInvalidRequest},
		{"DELETE", "DELETE", "", nil, 405, codeInvalidRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var resp *http.Response
			switch tt.body {
			case "":
				resp = c.post(t, tt.method, `{}`, tt.header)
			case "GET", "DELETE":
				resp = env.do(t, tt.body, "/mcp", nil, c.headers("", tt.header))
			default:
				resp = env.do(t, "POST", "/mcp", strings.NewReader(tt.body), c.headers(tt.method, tt.header))
			}
			body := readBody(t, resp)
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("POST /mcp = %d, want %d: %s", resp.StatusCode, tt.wantStatus, body)
			}
			var r rpcReply
			json.Unmarshal([]byte(body), &r)
			if tt.wantCode != 0 && (r.Error == nil || r.Error.Code != tt.wantCode) {
				t.Errorf("body = %s, want JSON-RPC error %d", body, tt.wantCode)
			}
			if resp.Header.Get("Mcp-Session-Id") != "" {
				t.Errorf("a 2026-07-28 answer carries Mcp-Session-Id")
			}
		})
	}

	t.Run("the version error lists what is served", func(t *testing.T) {
		resp := env.do(t, "POST", "/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{`+meta("2099-01-01")+`}}`),
			c.headers("tools/list", http.Header{"Mcp-Protocol-Version": {"2099-01-01"}}))
		var r struct {
			Error struct {
				Data struct {
					Supported []string
					Requested string
				}
			}
		}
		decodeJSON(t, resp, http.StatusBadRequest, &r)
		if !slices.Equal(r.Error.Data.Supported, []string{"2026-07-28", "2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"}) || r.Error.Data.Requested != "2099-01-01" {
			t.Errorf("error data = %+v", r.Error.Data)
		}
	})
	t.Run("the legacy session is untouched", func(t *testing.T) {
		if resp := legacy.post(t, `{"jsonrpc":"2.0","id":9,"method":"ping"}`, nil); resp.StatusCode != http.StatusOK {
			t.Errorf("ping in the legacy session = %d, want 200", resp.StatusCode)
		}
		if resp := legacy.post(t, `{"jsonrpc":"2.0","id":9,"method":"ping"}`, http.Header{"Mcp-Protocol-Version": {"2026-07-28"}}); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("a legacy session's request with a 2026-07-28 header = %d, want 400", resp.StatusCode)
		}
	})
	t.Run("a signed-in session that ends gets 401", func(t *testing.T) {
		tokens := env.signIn(t, signInOptions{})
		ended := &modernClient{env: env, token: tokens.AccessToken}
		env.postForm(t, "/revoke", url.Values{"token": {tokens.RefreshToken}, "client_id": {tokens.clientID}}, nil)
		if resp := ended.post(t, "tools/list", `{}`, nil); resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("tools/list after revocation = %d, want 401", resp.StatusCode)
		}
		// Ended during the call: Entra refuses to renew its token.
		env.entra.set(func() { env.entra.expiresIn = 600 })
		renewed := &modernClient{env: env, token: env.signIn(t, signInOptions{}).AccessToken}
		env.entra.set(func() { env.entra.refreshRevoked = true })
		env.clock.advance(10 * time.Minute)
		if resp := renewed.post(t, "tools/call", `{"name":"getUserDetails","arguments":{}}`, nil); resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("tools/call whose Entra token cannot be renewed = %d, want 401", resp.StatusCode)
		}
	})
}

func TestBatchesOnlyIn20250326(t *testing.T) {
	env := newTestEnv(t)
	c := &mcpClient{env: env, token: env.signIn(t, signInOptions{}).AccessToken}
	c.initialize(t, "2025-03-26")
	var replies []rpcReply
	resp := c.post(t, `[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"},
		{"jsonrpc":"2.0","id":2,"method":"tools/list"},{"jsonrpc":"1.0","id":3,"method":"ping"}]`, nil)
	decodeJSON(t, resp, http.StatusOK, &replies)
	ids := []string{}
	for _, r := range replies {
		ids = append(ids, string(r.ID))
	}
	slices.Sort(ids)
	if !slices.Equal(ids, []string{"1", "2", "3"}) || replies[0].Error == nil || replies[0].Error.Code != codeInvalidRequest {
		t.Errorf("batch replies = %+v, want answers to 1 and 2 and an error for the invalid 3, first", replies)
	}
	if resp := c.post(t, `[{"jsonrpc":"2.0","method":"notifications/initialized"}]`, nil); resp.StatusCode != http.StatusAccepted {
		t.Errorf("a batch of notifications = %d, want 202", resp.StatusCode)
	}
	tooMany := "[" + strings.Repeat(`{"jsonrpc":"2.0","id":1,"method":"ping"},`, maxBatch) + `{"jsonrpc":"2.0","id":1,"method":"ping"}]`
	for _, body := range []string{`[]`, tooMany, `[{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-03-26"}}]`,
		`[{"jsonrpc":"2.0","id":1,"method":"ping","id":2}]`} { // a member twice
		if resp := c.post(t, body, nil); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("POST %s = %d, want 400", body, resp.StatusCode)
		}
	}
}

// TestResultShapesFollowTheVersion checks that structured tool results
// (outputSchema, structuredContent) go only to sessions of MCP 2025-06-18 or
// later, on either transport.
func TestResultShapesFollowTheVersion(t *testing.T) {
	env := newTestEnv(t)
	token := env.signIn(t, signInOptions{}).AccessToken
	for _, version := range supportedVersions {
		t.Run(version, func(t *testing.T) {
			c := &mcpClient{env: env, token: token}
			c.initialize(t, version)
			sse := env.connect(t, token)
			var init any
			sse.call(t, "initialize", `{"protocolVersion":"`+version+`"}`, &init)
			for name, call := range map[string]func(method, params string, v any){
				"/mcp": func(m, p string, v any) { c.call(t, m, p, v) },
				"/sse": func(m, p string, v any) { sse.call(t, m, p, v) },
			} {
				var list struct{ Tools []tool }
				var result map[string]any
				call("tools/list", "", &list)
				call("tools/call", `{"name":"getUserDetails"}`, &result)
				want := version >= "2025-06-18"
				if got := list.Tools[0].OutputSchema != nil; got != want {
					t.Errorf("%s: outputSchema present = %v, want %v", name, got, want)
				}
				if got := result["structuredContent"] != nil; got != want {
					t.Errorf("%s: structuredContent present = %v, want %v", name, got, want)
				}
			}
		})
	}
}

// TestOneTokenBothTransports shows that one sign-in serves both transports
// in the same process, through the same MCP core, and that ending the session
// ends both.
func TestOneTokenBothTransports(t *testing.T) {
	env := newTestEnv(t)
	tokens := env.signIn(t, signInOptions{resource: env.url}) // the root resource covers /mcp and /sse
	sse := env.connect(t, tokens.AccessToken)
	streamable := &mcpClient{env: env, token: tokens.AccessToken}
	streamable.initialize(t, "2025-03-26")

	var viaSSE, viaMCP toolResult
	sse.call(t, "tools/call", `{"name":"getUserDetails"}`, &viaSSE)
	streamable.call(t, "tools/call", `{"name":"getUserDetails"}`, &viaMCP)
	if viaSSE.IsError || !reflect.DeepEqual(viaSSE, viaMCP) {
		t.Errorf("tools/call over /sse = %+v, over /mcp = %+v; want the same result", viaSSE, viaMCP)
	}

	resp := env.postForm(t, "/revoke", url.Values{"token": {tokens.RefreshToken}, "client_id": {tokens.clientID}}, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revoke = %d", resp.StatusCode)
	}
	if _, err := sse.events.next(); !errors.Is(err, io.EOF) {
		t.Errorf("SSE stream after revocation: %v, want EOF", err)
	}
	if resp := streamable.post(t, `{"jsonrpc":"2.0","id":1,"method":"ping"}`, nil); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("POST /mcp after revocation = %d, want 401", resp.StatusCode)
	}
}

func TestJSONRPC(t *testing.T) {
	env := newTestEnv(t)
	tokens := env.signIn(t, signInOptions{})
	conn := env.connect(t, tokens.AccessToken)

	// Bodies that are not one JSON-RPC message get 400 and the error in
	// the body, with a null id.
	for _, tt := range []struct {
		name, body string
		wantCode   int
		wantID     string
	}{
		{"malformed JSON", `{"jsonrpc":"2.0",`, codeParseError, "null"},
		{"not an object", `"ping"`, codeInvalidRequest, "null"},
		{"wrong version", `{"jsonrpc":"1.0","id":1,"method":"ping"}`, codeInvalidRequest, "1"},
		{"null id", `{"jsonrpc":"2.0","id":null,"method":"ping"}`, codeInvalidRequest, "null"},
		{"object id", `{"jsonrpc":"2.0","id":{},"method":"ping"}`, codeInvalidRequest, "null"},
		{"no method", `{"jsonrpc":"2.0","id":"a"}`, codeInvalidRequest, `"a"`},
		{"batch", `[{"jsonrpc":"2.0","id":1,"method":"ping"}]`, codeInvalidRequest, "null"},
		// encoding/json would take the last of two names, and names in any
		// case: a gateway reading the first "method" would be fooled.
		{"a member twice", `{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/list"}`, codeInvalidRequest, "null"},
		{"a member in another case", `{"jsonrpc":"2.0","id":1,"Method":"tools/list"}`, codeInvalidRequest, "null"},
		{"a params member in another case", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"NAME":"getUserDetails"}}`, codeInvalidRequest, "null"},
		{"a member twice, deep in the arguments", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"getUserDetails","arguments":{"a":[{"b":1,"b":2}]}}}`, codeInvalidRequest, "null"},
		{"a member twice, after an empty name", `{"jsonrpc":"2.0","id":1,"":"z","method":"ping","method":"tools/list"}`, codeInvalidRequest, "null"},
		{"a member twice, one name escaped", `{"jsonrpc":"2.0","id":1,"method":"ping","\u006dethod":"tools/list"}`, codeInvalidRequest, "null"},
		{"a member in another case, by Unicode folding (long s)", `{"jsonrpc":"2.0","id":1,"method":"ping","param\u017f":{}}`, codeInvalidRequest, "null"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var r struct {
				ID    json.RawMessage
				Error rpcError
			}
			decodeJSON(t, conn.post(t, tt.body), http.StatusBadRequest, &r)
			if r.Error.Code != tt.wantCode || string(r.ID) != tt.wantID {
				t.Errorf("POST %s = id %s, error %+v; want id %s, code %d", tt.body, r.ID, r.Error, tt.wantID, tt.wantCode)
			}
		})
	}

	t.Run("too large", func(t *testing.T) {
		body := `{"jsonrpc":"2.0","id":1,"method":"ping","params":{"pad":"` + strings.Repeat("x", maxMessageSize) + `"}}`
		var r struct{ Error rpcError }
		decodeJSON(t, conn.post(t, body), http.StatusRequestEntityTooLarge, &r)
		if r.Error.Code != codeInvalidRequest {
			t.Errorf("oversized message: error %+v", r.Error)
		}
	})

	// Requests get their answer on the stream: a result or an error.
	for _, tt := range []struct {
		name, method, params string
		wantCode             int
		wantResult           string
	}{
		{"ping", "ping", ``, 0, `{}`},
		{"newer version negotiates down", "initialize", `{"protocolVersion":"2099-01-01"}`, 0, `"protocolVersion":"2025-11-25"`},
		{"supported version is kept", "initialize", `{"protocolVersion":"2025-06-18"}`, 0, `"protocolVersion":"2025-06-18"`},
		{"initialize without params", "initialize", ``, codeInvalidParams, ``},
		{"unknown method", "resources/list", `{}`, codeMethodNotFound, ``},
		{"unknown tool", "tools/call", `{"name":"deleteEverything"}`, codeInvalidParams, ``},
		{"tools/call without params", "tools/call", ``, codeInvalidParams, ``},
		{"tool arguments are the tool's: any case", "tools/call", `{"name":"getUserDetails","arguments":{"Name":1,"name":2}}`, 0, `Adele Vance`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			resp := conn.request(t, tt.method, tt.params)
			if tt.wantCode != 0 {
				if resp.Error == nil || resp.Error.Code != tt.wantCode {
					t.Errorf("%s = %s, want error %d", tt.method, resp.raw, tt.wantCode)
				}
				return
			}
			if resp.Error != nil || !strings.Contains(string(resp.Result), tt.wantResult) {
				t.Errorf("%s = %s, want a result with %s", tt.method, resp.raw, tt.wantResult)
			}
		})
	}

	t.Run("notifications get no answer", func(t *testing.T) {
		for _, n := range []string{`{"jsonrpc":"2.0","method":"notifications/initialized"}`, `{"jsonrpc":"2.0","method":"notifications/unknown"}`,
			`{"jsonrpc":"2.0","id":7,"result":{}}`} {
			if resp := conn.post(t, n); resp.StatusCode != http.StatusAccepted {
				t.Errorf("POST %s = %d, want 202", n, resp.StatusCode)
			}
		}
		// The next event on the stream answers the next request: nothing was
		// queued for the notifications.
		if resp := conn.request(t, "ping", ""); string(resp.ID) != fmt.Sprint(conn.nextID-1) {
			t.Errorf("next event = %s, want the ping's answer", resp.raw)
		}
	})
}

// ---- Step 10: the tool and Microsoft Graph ----

func TestToolGraphFailure(t *testing.T) {
	env := newTestEnv(t)
	conn := env.connect(t, env.signIn(t, signInOptions{}).AccessToken)
	env.entra.set(func() { env.entra.graphStatus = http.StatusServiceUnavailable }) // Graph is down
	var result toolResult
	conn.call(t, "tools/call", `{"name":"getUserDetails"}`, &result)
	if want := "503 serviceNotAvailable"; !result.IsError || !strings.Contains(result.Content[0].Text, want) {
		t.Errorf("tools/call = %+v, want isError and %q", result, want)
	}
}

func TestGraphRefusesTheToken(t *testing.T) {
	env := newTestEnv(t)
	c := &mcpClient{env: env, token: env.signIn(t, signInOptions{}).AccessToken}
	c.initialize(t, "2025-11-25")

	t.Run("refused once: refresh, retry, done", func(t *testing.T) {
		env.entra.set(func() { env.entra.accessTokens = map[string]fakeGrant{} }) // e.g. revoked early
		var result toolResult
		c.call(t, "tools/call", `{"name":"getUserDetails"}`, &result)
		if n := env.entra.refreshCount(); result.IsError || n != 1 {
			t.Errorf("tools/call = %+v after %d refreshes, want a result after 1", result, n)
		}
	})
	t.Run("refused again: one retry, no loop", func(t *testing.T) {
		env.entra.set(func() { env.entra.graphStatus = http.StatusUnauthorized })
		var result toolResult
		c.call(t, "tools/call", `{"name":"getUserDetails"}`, &result)
		if n := env.entra.refreshCount(); !result.IsError || !strings.Contains(result.Content[0].Text, "401 InvalidAuthenticationToken") || n != 2 {
			t.Errorf("tools/call = %+v after %d refreshes in all, want an error after 2", result, n)
		}
	})
}

func TestGraphConnectionsAreReused(t *testing.T) {
	env := newTestEnv(t)
	c := &mcpClient{env: env, token: env.signIn(t, signInOptions{}).AccessToken}
	c.initialize(t, "2025-11-25")
	call := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"getUserDetails"}}`
	before := func() int { env.entra.mu.Lock(); defer env.entra.mu.Unlock(); return env.entra.connections }()
	for range 5 { // five rounds of eight concurrent calls
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				if got := postRaw(t.Context(), env.url+"/mcp", c.headers(nil), call); !strings.HasPrefix(got, "200 ") {
					t.Errorf("tools/call = %s", got)
				}
			})
		}
		wg.Wait()
	}
	env.entra.mu.Lock()
	defer env.entra.mu.Unlock()
	if n := env.entra.connections - before; n > 8 {
		t.Errorf("40 tool calls, 8 at a time, opened %d connections to Graph; want at most 8, kept alive", n)
	}
}

// ---- Lifecycle: refresh, revocation, Entra renewal, restarts, start and shutdown ----

func TestRefresh(t *testing.T) {
	env := newTestEnv(t)
	c := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	first := env.redeem(t, c, env.codeFor(t, c))

	t.Run("an expired access token is refreshed, and the refresh token rotates", func(t *testing.T) {
		env.clock.advance(time.Hour)
		if resp := env.do(t, "POST", "/mcp", nil, bearer(first.AccessToken)); resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("POST /mcp with an expired token = %d, want 401", resp.StatusCode)
		}
		var second tokenResponse
		decodeJSON(t, env.refresh(t, first.RefreshToken, c.id), http.StatusOK, &second)
		if second.RefreshToken == first.RefreshToken || tokenClaims(t, second.AccessToken)["sid"] != tokenClaims(t, first.AccessToken)["sid"] {
			t.Errorf("refresh = %+v, want a new refresh token for the same session", second)
		}
		(&mcpClient{env: env, token: second.AccessToken}).initialize(t, "2025-11-25")

		// A duplicate of that refresh, within the grace window, gets the
		// same new tokens instead of ending the session.
		env.clock.advance(env.srv.refreshGrace() - time.Second)
		var again tokenResponse
		decodeJSON(t, env.refresh(t, first.RefreshToken, c.id), http.StatusOK, &again)
		if again.AccessToken != second.AccessToken || again.RefreshToken != second.RefreshToken || again.ExpiresIn != second.ExpiresIn-int64((env.srv.refreshGrace()-time.Second)/time.Second) {
			t.Errorf("duplicate refresh = %+v, want the same tokens as %+v, expiring as they do", again, second)
		}
		first = second
	})

	t.Run("two refreshes at once with the same token both get the same new tokens", func(t *testing.T) {
		form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {first.RefreshToken}, "client_id": {c.id}}.Encode()
		h := http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}
		answers := make([]string, 2)
		var wg sync.WaitGroup
		for i := range answers {
			wg.Go(func() { answers[i] = postRaw(t.Context(), env.url+"/token", h, form) })
		}
		wg.Wait()
		if !strings.HasPrefix(answers[0], "200 ") || answers[0] != answers[1] {
			t.Fatalf("concurrent refreshes = %q and %q, want the same 200", answers[0], answers[1])
		}
		var next tokenResponse
		json.Unmarshal([]byte(strings.TrimPrefix(answers[0], "200 ")), &next)
		first = next
	})

	t.Run("another client cannot use the refresh token, nor spoil it", func(t *testing.T) {
		other := env.newClient(t, `"token_endpoint_auth_method":"none"`)
		wantOAuthError(t, env.refresh(t, first.RefreshToken, other.id), 400, "invalid_grant")
		wantOAuthError(t, env.refresh(t, first.RefreshToken+"x", c.id), 400, "invalid_grant")
		var next tokenResponse
		decodeJSON(t, env.refresh(t, first.RefreshToken, c.id), http.StatusOK, &next)
		first = next
	})

	t.Run("a replaced refresh token used after the grace window ends the session", func(t *testing.T) {
		var next tokenResponse
		decodeJSON(t, env.refresh(t, first.RefreshToken, c.id), http.StatusOK, &next)
		env.clock.advance(env.srv.refreshGrace())
		wantOAuthError(t, env.refresh(t, first.RefreshToken, c.id), 400, "invalid_grant") // the thief, or the client: no telling
		if resp := env.do(t, "POST", "/mcp", nil, bearer(next.AccessToken)); resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("POST /mcp with the newest access token = %d, want 401: the session has ended", resp.StatusCode)
		}
		wantOAuthError(t, env.refresh(t, next.RefreshToken, c.id), 400, "invalid_grant")
	})
}

func TestRefreshEdges(t *testing.T) {
	env := newTestEnv(t)
	c := env.newClient(t, `"token_endpoint_auth_method":"client_secret_basic"`)
	refresh := func(token string) *http.Response {
		h := http.Header{"Authorization": {"Basic " + base64.StdEncoding.EncodeToString([]byte(c.id+":"+c.secret))}}
		return env.postForm(t, "/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {token}}, h)
	}
	tokens := env.redeem(t, c, env.codeFor(t, c))

	t.Run("a confidential client refreshes with HTTP Basic", func(t *testing.T) {
		decodeJSON(t, refresh(tokens.RefreshToken), http.StatusOK, &tokens)
	})
	t.Run("a later generation than the server remembers moves it forward", func(t *testing.T) {
		// As after a restart from a state file that missed the last save.
		sid := tokenClaims(t, tokens.AccessToken)["sid"].(string)
		sess, _ := env.srv.sessions.get(sid)
		sess.mu.Lock()
		sess.refreshGen--
		sess.mu.Unlock()
		decodeJSON(t, refresh(tokens.RefreshToken), http.StatusOK, &tokens)
		if resp := env.do(t, "GET", "/sse", nil, bearer(tokens.AccessToken)); resp.StatusCode != http.StatusOK {
			t.Errorf("GET /sse after moving forward = %d, want 200", resp.StatusCode)
		}
	})
	t.Run("a refresh may not move the session to another resource", func(t *testing.T) {
		h := http.Header{"Authorization": {"Basic " + base64.StdEncoding.EncodeToString([]byte(c.id+":"+c.secret))}}
		for _, tt := range []struct {
			resource string
			want     int
		}{{"https://evil.example", 400}, {env.url + "/sse", 200}, {env.url + "/mcp", 200}} {
			resp := env.postForm(t, "/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {tokens.RefreshToken}, "resource": {tt.resource}}, h)
			if resp.StatusCode != tt.want {
				t.Errorf("refresh of a whole-server session for %s = %d, want %d", tt.resource, resp.StatusCode, tt.want)
			}
			if tt.want == 200 {
				decodeJSON(t, resp, 200, &tokens)
			}
		}
		sse := env.signIn(t, signInOptions{resource: env.url + "/sse"})
		resp := env.postForm(t, "/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {sse.RefreshToken},
			"client_id": {sse.clientID}, "resource": {env.url + "/mcp"}}, nil)
		wantOAuthError(t, resp, 400, "invalid_target")
	})
	t.Run("a session nobody refreshes for REFRESH_TOKEN_TTL ends", func(t *testing.T) {
		env.clock.advance(env.cfg.refreshTTL)
		wantOAuthError(t, refresh(tokens.RefreshToken), 400, "invalid_grant")
	})
}

// TestTokensForAPartOfTheGrant asks both grants for an access token for one
// endpoint of a whole-server sign-in (RFC 8707 §2.2): each token is for
// exactly what was asked, while the session and its refresh token keep the
// whole grant; a resource outside the grant is refused by both.
func TestTokensForAPartOfTheGrant(t *testing.T) {
	env := newTestEnv(t)
	works := func(t *testing.T, token string, want map[string]bool) {
		t.Helper()
		for path, ok := range want {
			method := map[string]string{"/sse": "GET", "/mcp": "DELETE"}[path] // DELETE: 401 or 400, nothing is opened
			resp := env.do(t, method, path, nil, bearer(token))
			if got := resp.StatusCode != http.StatusUnauthorized; got != ok {
				t.Errorf("%s %s with a token for %v = %d, want it accepted: %v", method, path, tokenClaims(t, token)["aud"], resp.StatusCode, ok)
			}
		}
	}
	c := env.newClient(t, `"token_endpoint_auth_method":"none"`) // signs in for the whole server
	form := url.Values{"grant_type": {"authorization_code"}, "code": {env.codeFor(t, c)}, "redirect_uri": {c.redirectURI},
		"client_id": {c.id}, "code_verifier": {c.verifier}, "resource": {env.url + "/mcp"}}
	var tokens tokenResponse
	decodeJSON(t, env.postForm(t, "/token", form, nil), http.StatusOK, &tokens)
	works(t, tokens.AccessToken, map[string]bool{"/mcp": true, "/sse": false})

	refresh := func(rt, resource string) tokenResponse {
		f := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "client_id": {c.id}}
		if resource != "" {
			f.Set("resource", resource)
		}
		var next tokenResponse
		decodeJSON(t, env.postForm(t, "/token", f, nil), http.StatusOK, &next)
		return next
	}
	whole := refresh(tokens.RefreshToken, "")
	works(t, whole.AccessToken, map[string]bool{"/mcp": true, "/sse": true})
	sse := refresh(whole.RefreshToken, env.url+"/sse")
	works(t, sse.AccessToken, map[string]bool{"/mcp": false, "/sse": true})
	if again := refresh(whole.RefreshToken, env.url+"/sse"); again.AccessToken != sse.AccessToken {
		t.Errorf("a duplicate refresh for the same resource got another token")
	}
	if other := refresh(whole.RefreshToken, env.url+"/mcp"); other.AccessToken == sse.AccessToken || tokenClaims(t, other.AccessToken)["aud"] != env.url+"/mcp" {
		t.Errorf("a duplicate refresh for another resource got a token for %v, want one for /mcp", tokenClaims(t, other.AccessToken)["aud"])
	}
	works(t, refresh(sse.RefreshToken, "").AccessToken, map[string]bool{"/mcp": true, "/sse": true}) // the session kept the whole grant

	mcpOnly := env.signIn(t, signInOptions{resource: env.url + "/mcp"})
	c2 := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	c2.resource = env.url + "/mcp"
	wantOAuthError(t, env.postForm(t, "/token", url.Values{"grant_type": {"authorization_code"}, "code": {env.codeFor(t, c2)},
		"redirect_uri": {c2.redirectURI}, "client_id": {c2.id}, "code_verifier": {c2.verifier}, "resource": {env.url + "/sse"}}, nil), 400, "invalid_target")
	wantOAuthError(t, env.postForm(t, "/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {mcpOnly.RefreshToken},
		"client_id": {mcpOnly.clientID}, "resource": {env.url}}, nil), 400, "invalid_target")
}

// TestShortAccessTokens runs with access tokens of one second, as a learner
// would to watch refreshes happen: the setting is accepted with a note in the
// log, a duplicate refresh never gets a token that has already expired, and
// every refresh, ours and Entra's, shows in the log.
func TestShortAccessTokens(t *testing.T) {
	cfg, err := loadConfig(func(k string) string {
		return map[string]string{"ENTRA_TENANT_ID": "t", "ENTRA_CLIENT_ID": "c", "ENTRA_CLIENT_SECRET": "s", "ACCESS_TOKEN_TTL": "1s"}[k]
	})
	if err != nil || cfg.accessTTL != time.Second {
		t.Fatalf("loadConfig(ACCESS_TOKEN_TTL=1s) = %v, %v; want 1s", cfg.accessTTL, err)
	}
	for ttl, wantNote := range map[time.Duration]bool{time.Second: true, 9 * time.Minute: true, 10 * time.Minute: false, time.Hour: false} {
		var logs bytes.Buffer
		logConfigNotes(slog.New(slog.NewTextHandler(&logs, nil)), config{accessTTL: ttl})
		if got := strings.Contains(logs.String(), "refresh often"); got != wantNote {
			t.Errorf("ACCESS_TOKEN_TTL=%v: note at start = %v, want %v (log: %q)", ttl, got, wantNote, logs.String())
		}
	}

	env := newTestEnv(t, func(c *config) { c.accessTTL = time.Second })
	env.clock.advance(700 * time.Millisecond) // off the whole second: exp is in whole seconds
	if got := env.srv.refreshGrace(); got != 500*time.Millisecond {
		t.Errorf("refresh grace = %v, want half the access tokens' lifetime", got)
	}
	env.entra.set(func() { env.entra.expiresIn = 90 }) // Entra tokens for a minute and a half
	first := env.signIn(t, signInOptions{})
	var second tokenResponse
	decodeJSON(t, env.refresh(t, first.RefreshToken, first.clientID), http.StatusOK, &second)
	if !strings.Contains(env.logs.String(), `msg="tokens refreshed" client_id=`+first.clientID) || !strings.Contains(env.logs.String(), "generation=1") {
		t.Errorf("no log line for the refresh:\n%s", env.logs)
	}

	env.clock.advance(400 * time.Millisecond) // within the grace window: a duplicate
	var again tokenResponse
	decodeJSON(t, env.refresh(t, first.RefreshToken, first.clientID), http.StatusOK, &again)
	if again.AccessToken != second.AccessToken || again.ExpiresIn < 1 {
		t.Errorf("duplicate refresh = %+v, want the same, unexpired tokens as %+v", again, second)
	}
	if _, err := env.srv.tokens.verify(again.AccessToken); err != nil {
		t.Errorf("the duplicate's access token: %v, want it valid", err)
	}

	env.clock.advance(200 * time.Millisecond) // past the grace window: a replayed token
	wantOAuthError(t, env.refresh(t, first.RefreshToken, first.clientID), 400, "invalid_grant")
	if resp := env.refresh(t, second.RefreshToken, first.clientID); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("refresh after the replay = %d, want 400: the session has ended", resp.StatusCode)
	}

	// The server renews the Entra token when it is about to expire, and says so.
	third := env.signIn(t, signInOptions{})
	env.clock.advance(31 * time.Second) // the Entra token expires within a minute
	var next tokenResponse
	decodeJSON(t, env.refresh(t, third.RefreshToken, third.clientID), http.StatusOK, &next)
	if !strings.Contains(env.logs.String(), `msg="Entra token renewed"`) {
		t.Errorf("no log line for the Entra renewal:\n%s", env.logs)
	}
}

func TestRevoke(t *testing.T) {
	env := newTestEnv(t)
	c := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	revoke := func(token, clientID string) {
		t.Helper()
		resp := env.postForm(t, "/revoke", url.Values{"token": {token}, "client_id": {clientID}}, nil)
		if resp.StatusCode != http.StatusOK {
			t.Errorf("POST /revoke = %d, want 200", resp.StatusCode)
		}
	}
	t.Run("a confidential client revokes with HTTP Basic", func(t *testing.T) {
		cc := env.newClient(t, `"token_endpoint_auth_method":"client_secret_basic"`)
		tokens := env.redeem(t, cc, env.codeFor(t, cc))
		h := http.Header{"Authorization": {"Basic " + base64.StdEncoding.EncodeToString([]byte(cc.id+":"+cc.secret))}}
		if resp := env.postForm(t, "/revoke", url.Values{"token": {tokens.RefreshToken}}, h); resp.StatusCode != http.StatusOK {
			t.Fatalf("POST /revoke = %d", resp.StatusCode)
		}
		if resp := env.do(t, "GET", "/sse", nil, bearer(tokens.AccessToken)); resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET /sse after revocation = %d, want 401", resp.StatusCode)
		}
	})
	for _, kind := range []string{"access token", "refresh token"} {
		t.Run(kind, func(t *testing.T) {
			tokens := env.redeem(t, c, env.codeFor(t, c))
			token := map[string]string{"access token": tokens.AccessToken, "refresh token": tokens.RefreshToken}[kind]
			revoke("unknown", c.id) // RFC 7009 §2.2: 200 for unknown tokens
			other := env.newClient(t, `"token_endpoint_auth_method":"none"`)
			revoke(token, other.id) // another client's token: nothing happens
			if resp := env.do(t, "POST", "/mcp", nil, bearer(tokens.AccessToken)); resp.StatusCode == http.StatusUnauthorized {
				t.Fatalf("another client revoked this client's session")
			}
			revoke(token, c.id)
			if resp := env.do(t, "POST", "/mcp", nil, bearer(tokens.AccessToken)); resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("POST /mcp after revoking the %s = %d, want 401", kind, resp.StatusCode)
			}
			resp := env.refresh(t, tokens.RefreshToken, c.id)
			wantOAuthError(t, resp, 400, "invalid_grant")
		})
	}
}

func TestEndedSessionStaysEnded(t *testing.T) {
	env := newTestEnv(t)
	c := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	tokens := env.redeem(t, c, env.codeFor(t, c))
	sess, _ := env.srv.sessions.get(tokenClaims(t, tokens.AccessToken)["sid"].(string))
	client, _ := env.srv.clients.get(c.id)

	// A token request that loses the race with a revocation puts the
	// session back after endSession; its tokens must still not work.
	env.srv.endSession(sess)
	late, _ := env.srv.startSession(client, sess, sess.resource)
	if resp := env.do(t, "GET", "/sse", nil, bearer(late.AccessToken)); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET /sse with a token of an ended session = %d, want 401", resp.StatusCode)
	}
	resp := env.refresh(t, late.RefreshToken, c.id)
	wantOAuthError(t, resp, 400, "invalid_grant")
}

// TestRevocationEndsMCPSessions checks that ending a signed-in session
// removes its MCP sessions, and that a session opened by a request racing
// with the revocation is refused.
func TestRevocationEndsMCPSessions(t *testing.T) {
	env := newTestEnv(t)
	tokens := env.signIn(t, signInOptions{})
	c := &mcpClient{env: env, token: tokens.AccessToken}
	c.initialize(t, "2025-11-25")
	sess, _ := env.srv.sessions.get(tokenClaims(t, tokens.AccessToken)["sid"].(string))

	env.srv.endSession(sess)
	if _, ok := env.srv.mcp.get(c.sessionID); ok {
		t.Errorf("the Streamable HTTP session outlived its owner")
	}
	// A request that passed the token check just before the revocation
	// gets here after it.
	if err := env.srv.addMCPSession(&mcpSession{id: "late", owner: sess.id}, sess); !errors.Is(err, errSessionEnded) {
		t.Errorf("an MCP session was registered for an ended session")
	}
}

func TestEntraTokenRefresh(t *testing.T) {
	env := newTestEnv(t)
	env.entra.set(func() { env.entra.expiresIn = 600 }) // Entra tokens for 10 minutes
	c := &mcpClient{env: env, token: env.signIn(t, signInOptions{}).AccessToken}
	c.initialize(t, "2025-11-25")
	firstRT := env.entra.lastRefreshToken()
	call := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"getUserDetails"}}`

	t.Run("a fresh token is used as it is", func(t *testing.T) {
		var result toolResult
		c.call(t, "tools/call", `{"name":"getUserDetails"}`, &result)
		if n := env.entra.refreshCount(); result.IsError || n != 0 {
			t.Errorf("tools/call = %+v after %d refreshes, want a result and none", result, n)
		}
	})
	t.Run("an expiring token is refreshed once, however many calls need it", func(t *testing.T) {
		env.clock.advance(9*time.Minute + time.Second) // within a minute of its expiry
		statuses := make(chan string, 8)
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() { statuses <- postRaw(t.Context(), env.url+"/mcp", c.headers(nil), call) })
		}
		wg.Wait()
		close(statuses)
		for got := range statuses {
			if !strings.HasPrefix(got, "200 ") || !strings.Contains(got, "Adele Vance") || strings.Contains(got, `"isError":true`) {
				t.Errorf("concurrent tools/call = %s", got)
			}
		}
		env.entra.mu.Lock()
		defer env.entra.mu.Unlock()
		if len(env.entra.refreshes) != 1 {
			t.Fatalf("Entra got %d refresh_token grants, want exactly 1", len(env.entra.refreshes))
		}
		form := env.entra.refreshes[0]
		if form.Get("refresh_token") != firstRT || form.Get("client_id") != env.entra.clientID || form.Get("client_secret") != env.entra.clientSecret {
			t.Errorf("the refresh did not send the sign-in's refresh token and the app's secret in the body (AuthStyleInParams)")
		}
		if env.entra.graphToken != env.entra.lastAT {
			t.Errorf("Graph was called with an older Entra token, not the refreshed one")
		}
	})
	t.Run("the next refresh uses the rotated Entra refresh token", func(t *testing.T) {
		rotated := env.entra.lastRefreshToken()
		env.clock.advance(10 * time.Minute)
		var result toolResult
		c.call(t, "tools/call", `{"name":"getUserDetails"}`, &result)
		env.entra.mu.Lock()
		defer env.entra.mu.Unlock()
		if n := len(env.entra.refreshes); result.IsError || n != 2 || env.entra.refreshes[1].Get("refresh_token") != rotated {
			t.Errorf("after %d refreshes, the last sent %q; want 2, the last with the rotated token", n, env.entra.refreshes[n-1].Get("refresh_token"))
		}
	})
	t.Run("a refresh answered without a refresh token keeps the one it had", func(t *testing.T) {
		kept := env.entra.lastRefreshToken()
		env.entra.set(func() { env.entra.keepRT = true })
		for range 2 {
			env.clock.advance(10 * time.Minute)
			var result toolResult
			c.call(t, "tools/call", `{"name":"getUserDetails"}`, &result)
		}
		env.entra.mu.Lock()
		defer env.entra.mu.Unlock()
		if n := len(env.entra.refreshes); n != 4 || env.entra.refreshes[3].Get("refresh_token") != kept {
			t.Errorf("after %d refreshes, the last sent %q, want 4, the last with %q", n, env.entra.refreshes[n-1].Get("refresh_token"), kept)
		}
	})
}

func TestEntraRefusesToRenew(t *testing.T) {
	env := newTestEnv(t)
	env.entra.set(func() { env.entra.expiresIn = 600 })
	tokens := env.signIn(t, signInOptions{})
	c := &mcpClient{env: env, token: tokens.AccessToken}
	c.initialize(t, "2025-11-25")
	sse := env.connect(t, tokens.AccessToken)

	// The user's sessions are revoked in Entra; the Entra token expires.
	env.entra.set(func() { env.entra.refreshRevoked = true })
	env.clock.advance(10 * time.Minute)

	resp := c.post(t, `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"getUserDetails"}}`, nil)
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
		t.Errorf("tools/call after Entra refused = %d %q, want 401 invalid_token", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
	if !strings.Contains(env.logs.String(), "aadsts=50173") {
		t.Errorf("the log does not say why Entra refused")
	}
	if resp := sse.post(t, `{"jsonrpc":"2.0","id":1,"method":"ping"}`); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("POST /message = %d, want 401: the session has ended on both transports", resp.StatusCode)
	}
	resp = env.refresh(t, tokens.RefreshToken, tokens.clientID)
	wantOAuthError(t, resp, 400, "invalid_grant")

	// Signing in again works.
	env.entra.set(func() { env.entra.refreshRevoked = false })
	again := &mcpClient{env: env, token: env.signIn(t, signInOptions{}).AccessToken}
	again.initialize(t, "2025-11-25")
	var result toolResult
	again.call(t, "tools/call", `{"name":"getUserDetails"}`, &result)
	if result.IsError {
		t.Errorf("tools/call after signing in again = %+v", result)
	}
}

func TestEntraSignInBoundsOurs(t *testing.T) {
	tests := []struct {
		name  string
		knob  func(f *fakeEntra)
		after func(t *testing.T, env *testEnv, tokens signedIn)
	}{
		{"our refresh after Entra revoked the sign-in", func(f *fakeEntra) { f.refreshRevoked = true }, func(t *testing.T, env *testEnv, tokens signedIn) {
			resp := env.refresh(t, tokens.RefreshToken, tokens.clientID)
			wantOAuthError(t, resp, 400, "invalid_grant")
		}},
		{"Entra wants the user again (interaction_required)", func(f *fakeEntra) { f.refreshError = "interaction_required" }, func(t *testing.T, env *testEnv, tokens signedIn) {
			resp := env.refresh(t, tokens.RefreshToken, tokens.clientID)
			wantOAuthError(t, resp, 400, "invalid_grant")
		}},
		{"Entra is down: our refresh goes ahead", func(f *fakeEntra) { f.refreshError = "temporarily_unavailable" }, func(t *testing.T, env *testEnv, tokens signedIn) {
			var next tokenResponse
			resp := env.refresh(t, tokens.RefreshToken, tokens.clientID)
			decodeJSON(t, resp, http.StatusOK, &next)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := newTestEnv(t)
			tokens := env.signIn(t, signInOptions{})
			env.entra.set(func() { tt.knob(env.entra) })
			env.clock.advance(time.Hour) // our token and Entra's have both expired
			tt.after(t, env, tokens)
		})
	}

	t.Run("a sign-in without an Entra refresh token ends when its Entra token does", func(t *testing.T) {
		env := newTestEnv(t)
		env.entra.set(func() { env.entra.noOfflineAccess = true })
		c := &mcpClient{env: env, token: env.signIn(t, signInOptions{}).AccessToken}
		c.initialize(t, "2025-11-25")
		env.clock.advance(59*time.Minute + time.Second)
		resp := c.post(t, `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"getUserDetails"}}`, nil)
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("tools/call = %d, want 401: the client must sign in again", resp.StatusCode)
		}
	})
}

func TestEndedSessionLeavesEntraAlone(t *testing.T) {
	env := newTestEnv(t)
	tokens := env.signIn(t, signInOptions{})
	sess, _ := env.srv.sessions.get(tokenClaims(t, tokens.AccessToken)["sid"].(string))
	env.clock.advance(time.Hour) // the Entra token has expired
	// A tool call that was waiting for the session's refresh lock when the
	// session ended (revoked, or refused by Entra) must not refresh it again.
	env.srv.endSession(sess)
	if _, err := env.srv.entraAccessToken(sess, ""); !errors.Is(err, errSessionEnded) || env.entra.refreshCount() != 0 {
		t.Errorf("entraAccessToken for an ended session = %v after %d refreshes, want errSessionEnded and none", err, env.entra.refreshCount())
	}
}

func TestSessionKeyRotation(t *testing.T) {
	oldKey, newKey := randomBytes(32), randomBytes(32)
	env := newTestEnv(t, func(c *config) { c.sessionKeys = [][]byte{oldKey} })
	tokens := env.signIn(t, signInOptions{})
	rotate := func(keys ...[]byte) { env.srv.tokens = newSessionCodec(env.url, env.clock.now, keys...) }

	rotate(newKey) // without SESSION_KEY_PREVIOUS, the old tokens are dead...
	if resp := env.do(t, "GET", "/sse", nil, bearer(tokens.AccessToken)); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("old access token under a new key alone = %d, want 401", resp.StatusCode)
	}
	wantOAuthError(t, env.refresh(t, tokens.RefreshToken, tokens.clientID), 400, "invalid_grant")

	rotate(newKey, oldKey) // ...with it, they work until they expire
	if resp := env.do(t, "POST", "/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}`),
		(&mcpClient{token: tokens.AccessToken}).headers(nil)); resp.StatusCode != http.StatusOK {
		t.Errorf("old access token with SESSION_KEY_PREVIOUS = %d, want 200", resp.StatusCode)
	}
	var next tokenResponse
	decodeJSON(t, env.refresh(t, tokens.RefreshToken, tokens.clientID), http.StatusOK, &next)
	header, _, _, _ := cut3(next.AccessToken)
	if oldHeader, _, _, _ := cut3(tokens.AccessToken); header == oldHeader {
		t.Errorf("the refreshed token is signed with the old key")
	}
	rotate(newKey) // the refreshed tokens need only the new key
	decodeJSON(t, env.refresh(t, next.RefreshToken, tokens.clientID), http.StatusOK, &next)
}

func TestRegistrationLifetime(t *testing.T) {
	env := newTestEnv(t)
	unused := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	used := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	env.redeem(t, used, env.codeFor(t, used))
	env.clock.advance(unusedClientTTL)
	for _, tt := range []struct {
		c    *testClient
		want int
	}{{unused, http.StatusBadRequest}, {used, http.StatusOK}} {
		if got := newBrowser(t).get(t, env.url+tt.c.authorizeURL(nil)).StatusCode; got != tt.want {
			t.Errorf("GET /authorize an hour after registering = %d, want %d", got, tt.want)
		}
	}
}

func TestIdleMCPSessionsExpire(t *testing.T) {
	env := newTestEnv(t)
	tokens := env.signIn(t, signInOptions{})
	c := &mcpClient{env: env, token: tokens.AccessToken}
	c.initialize(t, "2025-11-25")
	// later moves the clock and refreshes the access token, as the client
	// would after so long.
	later := func(d time.Duration) {
		env.clock.advance(d)
		resp := env.refresh(t, tokens.RefreshToken, tokens.clientID)
		decodeJSON(t, resp, http.StatusOK, &tokens.tokenResponse)
		c.token = tokens.AccessToken
	}
	later(mcpIdleTTL - time.Minute)
	var v any
	c.call(t, "ping", "", &v) // in use: the idle time starts again
	later(mcpIdleTTL - time.Minute)
	c.call(t, "ping", "", &v)
	later(mcpIdleTTL)
	if resp := c.post(t, `{"jsonrpc":"2.0","id":9,"method":"ping"}`, nil); resp.StatusCode != http.StatusNotFound {
		t.Errorf("ping after %v idle = %d, want 404", mcpIdleTTL, resp.StatusCode)
	}
}

func TestStateFileSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state[1]") // a glob, if read as one, matches state1
	for _, name := range []string{"state1.tmp5", "state[1].tmpx", "state[1].tmp"} {
		os.WriteFile(filepath.Join(dir, name), []byte("not ours"), 0o600)
	}
	env := newTestEnv(t, func(c *config) { c.stateFile = path })
	env.entra.set(func() { env.entra.expiresIn = 600 })
	tokens := env.signIn(t, signInOptions{})
	c := &mcpClient{env: env, token: tokens.AccessToken}
	c.initialize(t, "2025-11-25")
	env.clock.advance(10 * time.Minute) // the Entra token is refreshed, and rotated...
	var result toolResult
	c.call(t, "tools/call", `{"name":"getUserDetails"}`, &result)
	rotatedRT := env.entra.lastRefreshToken()

	os.WriteFile(path+".tmp123", []byte("half"), 0o600) // killed while writing, even
	if err := env.start(t); err != nil {                // ...then the process is killed and started again
		t.Fatal(err)
	}
	if _, err := os.Stat(path + ".tmp123"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a temporary file left by a killed write is still there")
	}
	for _, name := range []string{"state1.tmp5", "state[1].tmpx", "state[1].tmp"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("%s, which the server did not write, was removed at start: %v", name, err)
		}
	}

	t.Run("the file is private, and holds nothing readable", func(t *testing.T) {
		info, err := os.Stat(path)
		if err != nil || info.Mode().Perm() != 0o600 {
			t.Fatalf("state file: %v, mode %v; want 0600", err, info.Mode())
		}
		data, _ := os.ReadFile(path)
		for _, secret := range []string{env.entra.lastAccessToken(), rotatedRT, env.entra.user.name, env.entra.user.oid, tokens.clientID} {
			if bytes.Contains(data, []byte(secret)) {
				t.Errorf("the state file holds %q in the clear", secret)
			}
		}
	})
	t.Run("the same access token still works; the MCP session starts again", func(t *testing.T) {
		if resp := c.post(t, `{"jsonrpc":"2.0","id":1,"method":"ping"}`, nil); resp.StatusCode != http.StatusNotFound {
			t.Errorf("ping in the old MCP session = %d, want 404: MCP sessions are not kept", resp.StatusCode)
		}
		c.sessionID = ""
		c.initialize(t, "2025-11-25")
		var result toolResult
		c.call(t, "tools/call", `{"name":"getUserDetails"}`, &result)
		if result.IsError {
			t.Errorf("tools/call after the restart = %+v", result)
		}
	})
	t.Run("the kept Entra refresh token is the rotated one", func(t *testing.T) {
		env.clock.advance(10 * time.Minute)
		var result toolResult
		c.call(t, "tools/call", `{"name":"getUserDetails"}`, &result)
		env.entra.mu.Lock()
		defer env.entra.mu.Unlock()
		if last := env.entra.refreshes[len(env.entra.refreshes)-1]; result.IsError || last.Get("refresh_token") != rotatedRT {
			t.Errorf("after the restart, Entra got refresh token %q, want the rotated %q", last.Get("refresh_token"), rotatedRT)
		}
	})
	t.Run("the refresh token still works, and the client still exists", func(t *testing.T) {
		resp := env.refresh(t, tokens.RefreshToken, tokens.clientID)
		decodeJSON(t, resp, http.StatusOK, &tokens.tokenResponse)
		if err := env.start(t); err != nil { // once more: the new generation was kept too
			t.Fatal(err)
		}
		resp = env.refresh(t, tokens.RefreshToken, tokens.clientID)
		decodeJSON(t, resp, http.StatusOK, &tokens.tokenResponse)
	})
	t.Run("a revocation is kept too", func(t *testing.T) {
		env.postForm(t, "/revoke", url.Values{"token": {tokens.RefreshToken}, "client_id": {tokens.clientID}}, nil)
		if err := env.start(t); err != nil {
			t.Fatal(err)
		}
		if resp := env.do(t, "GET", "/sse", nil, bearer(tokens.AccessToken)); resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET /sse with a revoked session's token after a restart = %d, want 401", resp.StatusCode)
		}
	})
}

// TestStateFileUnderLoad refreshes several sessions at once while every
// refresh saves the state: saving takes each session's lock, refreshing holds
// one while it stores the session, and the two must not wait on each other.
// TestStateFileKeepsDocumentClients restarts a server whose client
// identified by a metadata document: its refresh works without a fetch, and
// the document is fetched again only at the next /authorize.
func TestStateFileKeepsDocumentClients(t *testing.T) {
	env := newTestEnv(t, func(c *config) { c.stateFile = filepath.Join(t.TempDir(), "state") })
	docs := env.publishDocuments(t)
	c := docs.publish("/client.json", "")
	tokens := env.signInWith(t, c)
	if err := env.start(t); err != nil {
		t.Fatal(err)
	}
	docs.answer("/client.json", http.StatusNotFound, nil, "") // the site is down: nothing may need it
	var refreshed tokenResponse
	decodeJSON(t, env.refresh(t, tokens.RefreshToken, c.id), http.StatusOK, &refreshed)
	if got := docs.fetches.Load(); got != 1 {
		t.Errorf("%d fetches, want 1: the first sign-in's", got)
	}
	if resp := newBrowser(t).get(t, env.url+c.authorizeURL(nil)); resp.StatusCode != http.StatusBadGateway {
		t.Errorf("GET /authorize after restart, with the document gone = %d, want 502: a new sign-in fetches it", resp.StatusCode)
	}

	t.Run("saved document clients that today's settings or rules refuse are dropped", func(t *testing.T) {
		md := clientMetadata{RedirectURIs: []string{"http://127.0.0.1/cb"}, TokenEndpointAuthMethod: "none", ClientName: "x"}
		for _, tt := range []struct {
			c        savedClient
			loopback bool
			want     bool
		}{
			{savedClient{ID: "https://app.example.com/c.json", Metadata: md}, false, true},
			{savedClient{ID: "https://127.0.0.1:8443/c.json", Metadata: md}, false, false},
			{savedClient{ID: "https://127.0.0.1:8443/c.json", Metadata: md}, true, true},
			{savedClient{ID: "https://app.example.com/c.json", Metadata: md, SecretHash: []byte("x")}, false, false},
			{savedClient{ID: "https://app.example.com/../c.json", Metadata: md}, false, false},
		} {
			s := &server{cfg: config{documents: true, documentsLoopback: tt.loopback}}
			if got := s.acceptsSavedDocumentClient(tt.c); got != tt.want {
				t.Errorf("acceptsSavedDocumentClient(%s, loopback %v) = %v, want %v", tt.c.ID, tt.loopback, got, tt.want)
			}
		}
	})
	t.Run("with CLIENT_METADATA_DOCUMENTS=off, saved document clients are dropped", func(t *testing.T) {
		env.cfg.documents = false
		if err := env.start(t); err != nil {
			t.Fatal(err)
		}
		wantOAuthError(t, env.refresh(t, refreshed.RefreshToken, c.id), http.StatusUnauthorized, "invalid_client")
	})
}

func TestStateFileUnderLoad(t *testing.T) {
	env := newTestEnv(t, func(c *config) { c.stateFile = filepath.Join(t.TempDir(), "state") })
	h := http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}
	// A deadlock shows as requests that never end: fail, rather than hang.
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	for range 8 {
		tokens := env.signIn(t, signInOptions{})
		wg.Go(func() {
			for range 200 {
				form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {tokens.RefreshToken}, "client_id": {tokens.clientID}}
				answer := postRaw(ctx, env.url+"/token", h, form.Encode())
				body, ok := strings.CutPrefix(answer, "200 ")
				if !ok || json.Unmarshal([]byte(body), &tokens.tokenResponse) != nil {
					t.Errorf("refresh = %s", answer)
					return
				}
			}
		})
	}
	wg.Wait()
}

func TestStateFileForgetsEndedSessions(t *testing.T) {
	env := newTestEnv(t, func(c *config) { c.stateFile = filepath.Join(t.TempDir(), "state") })
	tokens := env.signIn(t, signInOptions{})
	sess, _ := env.srv.sessions.get(tokenClaims(t, tokens.AccessToken)["sid"].(string))
	env.srv.endSession(sess)
	env.srv.sessions.put(sess.id, sess, time.Hour) // a token request that lost the race puts it back...
	env.srv.saveState()
	if err := env.start(t); err != nil { // ...and a restart must not bring it to life
		t.Fatal(err)
	}
	if resp := env.do(t, "GET", "/sse", nil, bearer(tokens.AccessToken)); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET /sse with an ended session's token after a restart = %d, want 401", resp.StatusCode)
	}
}

// TestStateFileKeepsRegistrationsApart checks that saving a session never
// rewrites the registrations, which have a file of their own; that run's
// background saver writes them, the last ones at shutdown; and that a file
// of version 1, which held both, is read and split.
func TestStateFileKeepsRegistrationsApart(t *testing.T) {
	key := randomBytes(32)
	env := newTestEnv(t, func(c *config) { c.stateFile = filepath.Join(t.TempDir(), "state"); c.sessionKeys = [][]byte{key} })
	md := clientMetadata{RedirectURIs: []string{"http://127.0.0.1/cb"}, TokenEndpointAuthMethod: "none", GrantTypes: []string{"authorization_code"}, ResponseTypes: []string{"code"}}
	for range 20 {
		env.newClient(t, `"token_endpoint_auth_method":"none"`)
	}
	env.srv.saveClients()
	clientsBefore, err := os.ReadFile(clientsFile(env.cfg.stateFile))
	if err != nil {
		t.Fatal(err)
	}
	signedIn := env.signIn(t, signInOptions{}) // saves the sessions, and registers a client
	decodeJSON(t, env.refresh(t, signedIn.RefreshToken, signedIn.clientID), http.StatusOK, &tokenResponse{})
	if clientsNow, _ := os.ReadFile(clientsFile(env.cfg.stateFile)); !bytes.Equal(clientsNow, clientsBefore) {
		t.Errorf("saving sessions rewrote the registrations")
	}
	sessions, version, _, err := readStateFile(env.cfg.stateFile, env.srv.tokens.keys, partSessions)
	if err != nil || version != 2 || len(sessions.Sessions) != 1 || len(sessions.Clients) != 0 {
		t.Fatalf("the sessions' file: version %d, %d sessions and %d clients, %v; want version 2 with the session alone", version, len(sessions.Sessions), len(sessions.Clients), err)
	}

	t.Run("a version 1 file, holding both, is read and split", func(t *testing.T) {
		st := savedState{Sessions: sessions.Sessions}
		env.srv.clients.each(func(c *client, expires time.Time) {
			st.Clients = append(st.Clients, savedClient{Metadata: c.clientMetadata, ID: c.ID, IssuedAt: c.IssuedAt, Expires: expires})
		})
		plain, _ := json.Marshal(st)
		k := env.srv.tokens.keys[0]
		nonce := randomBytes(12)
		v1, _ := json.Marshal(stateEnvelope{Format: stateFormat, Version: 1, Kid: k.stateID(), Nonce: nonce, Sealed: newGCM(k).Seal(nil, nonce, plain, []byte(partBoth))})
		path := filepath.Join(t.TempDir(), "state")
		os.WriteFile(path, v1, 0o600)
		cfg := env.cfg
		cfg.stateFile = path
		srv := newServer(cfg, env.logger, env.ec, env.clock.now)
		if err := srv.loadState(); err != nil || srv.clients.len() != len(st.Clients) || srv.sessions.len() != 1 {
			t.Fatalf("loading a version 1 file: %v, %d clients and %d sessions; want %d and 1", err, srv.clients.len(), srv.sessions.len(), len(st.Clients))
		}
		clients, version, _, err := readStateFile(clientsFile(path), srv.tokens.keys, partClients)
		if err != nil || version != 2 || len(clients.Clients) != len(st.Clients) {
			t.Errorf("after loading a version 1 file, the registrations' file holds %d clients (version %d, %v), want %d", len(clients.Clients), version, err, len(st.Clients))
		}
		if _, version, _, err := readStateFile(path, srv.tokens.keys, partSessions); err != nil || version != 2 {
			t.Errorf("after loading a version 1 file, it is version %d (%v), want 2", version, err)
		}
		srv.clients.put("registered-after", &client{clientMetadata: md, ID: "registered-after"}, time.Hour)
		srv.registrationsChanged()
		srv.saveClients()
		again := newServer(cfg, env.logger, env.ec, env.clock.now)
		if err := again.loadState(); err != nil || again.clients.len() != len(st.Clients)+1 {
			t.Errorf("a restart after a registration: %v, %d clients; want %d", err, again.clients.len(), len(st.Clients)+1)
		}
	})

	t.Run("a saved registration that today's rules refuse is dropped", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state")
		old := md
		old.RedirectURIs = []string{"ms-settings:privacy"}
		st := savedState{Clients: []savedClient{{Metadata: md, ID: "good", Expires: env.clock.now().Add(time.Hour)}, {Metadata: old, ID: "old", Expires: env.clock.now().Add(time.Hour)}}}
		if err := writeStateFile(clientsFile(path), env.srv.tokens.keys[0], partClients, st); err != nil {
			t.Fatal(err)
		}
		cfg := env.cfg
		cfg.stateFile = path
		srv := newServer(cfg, env.logger, env.ec, env.clock.now)
		if err := srv.loadState(); err != nil || srv.clients.len() != 1 {
			t.Fatalf("loadState = %v with %d clients, want the good one alone", err, srv.clients.len())
		}
		if _, ok := srv.clients.get("good"); !ok {
			t.Errorf("the good registration was dropped")
		}
	})

	t.Run("the two files cannot pass for each other", func(t *testing.T) {
		dir := t.TempDir()
		path := filepath.Join(dir, "state")
		sessionsFile, _ := os.ReadFile(env.cfg.stateFile)
		os.WriteFile(path, sessionsFile, 0o600)
		os.WriteFile(clientsFile(path), sessionsFile, 0o600) // the sessions, where the registrations belong
		cfg := env.cfg
		cfg.stateFile = path
		if err := newServer(cfg, env.logger, env.ec, env.clock.now).loadState(); err == nil || !strings.Contains(err.Error(), "damaged") {
			t.Errorf("loading the sessions' file as the registrations' = %v, want it refused", err)
		}
	})

	t.Run("registrations made while the server shuts down are saved too", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			stop := env.srv.startSavingClients(ctx)
			cancel()
			synctest.Wait() // the saver has seen the shutdown begin, saved, and returned
			env.srv.clients.put("registered-late", &client{clientMetadata: md, ID: "registered-late"}, time.Hour)
			env.srv.registrationsChanged() // a request in flight completes
			stop()
		})
		clients, _, _, err := readStateFile(clientsFile(env.cfg.stateFile), env.srv.tokens.keys, partClients)
		if err != nil || !slices.ContainsFunc(clients.Clients, func(c savedClient) bool { return c.ID == "registered-late" }) {
			t.Errorf("a registration made during shutdown was not saved (%v)", err)
		}
	})

	t.Run("a damaged registrations file stops the start", func(t *testing.T) {
		data, _ := os.ReadFile(clientsFile(env.cfg.stateFile))
		data[len(data)/2] ^= 1
		os.WriteFile(clientsFile(env.cfg.stateFile), data, 0o600)
		if err := newServer(env.cfg, env.logger, env.ec, env.clock.now).loadState(); err == nil || !strings.Contains(err.Error(), ".clients") {
			t.Errorf("loading a damaged registrations file = %v, want an error naming it", err)
		}
	})
}

func TestStateFileKeepsRegistrations(t *testing.T) {
	env := newTestEnv(t, func(c *config) { c.stateFile = filepath.Join(t.TempDir(), "state") })
	c := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	authorize := func() int { return newBrowser(t).get(t, env.url+c.authorizeURL(nil)).StatusCode }

	if err := env.start(t); err != nil {
		t.Fatal(err)
	}
	if got := authorize(); got != http.StatusOK {
		t.Errorf("GET /authorize after a restart = %d, want 200: the registration was kept", got)
	}
	used := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	env.srv.saveClients()                     // registered, and saved with its first hour
	env.redeem(t, used, env.codeFor(t, used)) // completes a sign-in: kept for clientTTL, not an hour...
	env.srv.saver.dirty.Store(false)          // ...but that save is lost to a crash: its live session keeps it
	env.clock.advance(2 * unusedClientTTL)
	if err := env.start(t); err != nil {
		t.Fatal(err)
	}
	if _, ok := env.srv.clients.get(used.id); !ok {
		t.Errorf("a client that completed a sign-in was forgotten after %v and a restart", 2*unusedClientTTL)
	}
	env.clock.advance(clientTTL) // unused for so long, it expires...
	if err := env.start(t); err != nil {
		t.Fatal(err)
	}
	if got := authorize(); got != http.StatusBadRequest {
		t.Errorf("GET /authorize for a registration expired before the restart = %d, want 400", got)
	}
}

func TestStateFileErrors(t *testing.T) {
	key, otherKey := randomBytes(32), randomBytes(32)
	env := newTestEnv(t, func(c *config) { c.stateFile = filepath.Join(t.TempDir(), "state"); c.sessionKeys = [][]byte{key} })
	env.signIn(t, signInOptions{})
	env.srv.saveClients()
	good, err := os.ReadFile(env.cfg.stateFile)
	if err != nil {
		t.Fatal(err)
	}
	goodClients, err := os.ReadFile(clientsFile(env.cfg.stateFile))
	if err != nil {
		t.Fatal(err)
	}
	var envelope stateEnvelope
	json.Unmarshal(good, &envelope)
	envelope.Sealed[len(envelope.Sealed)/2] ^= 1
	tampered, _ := json.Marshal(envelope)

	tests := []struct {
		name    string
		data    []byte
		keys    [][]byte
		wantErr string
	}{
		{"not a state file", []byte("garbage"), [][]byte{key}, "not an entra-mcp state file"},
		{"another format", []byte(`{"format":"something else"}`), [][]byte{key}, "not an entra-mcp state file"},
		{"a newer version", []byte(`{"format":"entra-mcp state","version":3}`), [][]byte{key}, "version 3"},
		{"another SESSION_KEY", good, [][]byte{otherKey}, "another SESSION_KEY"},
		{"damaged", tampered, [][]byte{key}, "damaged"},
		{"the old key as SESSION_KEY_PREVIOUS", good, [][]byte{otherKey, key}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state")
			os.WriteFile(path, tt.data, 0o600)
			if tt.wantErr == "" {
				os.WriteFile(clientsFile(path), goodClients, 0o600)
			}
			env.cfg.stateFile, env.cfg.sessionKeys = path, tt.keys
			err := env.start(t)
			if tt.wantErr == "" {
				if err != nil || env.srv.sessions.len() != 1 {
					t.Fatalf("start = %v with %d sessions, want the one session", err, env.srv.sessions.len())
				}
				cfg := env.cfg // both files were sealed again at start, with the new key
				cfg.sessionKeys = [][]byte{otherKey}
				if srv := newServer(cfg, env.logger, env.ec, env.clock.now); srv.loadState() != nil || srv.clients.len() == 0 || srv.sessions.len() != 1 {
					t.Errorf("after a start, the new key alone cannot open the files")
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "STATE_FILE") {
				t.Errorf("start = %v, want an error naming STATE_FILE and %q", err, tt.wantErr)
			}
			if data, _ := os.ReadFile(path); !bytes.Equal(data, tt.data) {
				t.Errorf("the state file was changed; it must be kept for the user to deal with")
			}
		})
	}
}

func TestRunConfigErrors(t *testing.T) {
	f := newFakeEntra(t, fakeEntraOptions{redirectURI: "http://localhost:3001/auth/callback"})
	base := map[string]string{
		"ENTRA_TENANT_ID": f.tenantID, "ENTRA_CLIENT_ID": f.clientID, "ENTRA_CLIENT_SECRET": f.clientSecret,
		"ENTRA_AUTHORITY": f.URL, "ADDR": "127.0.0.1:0",
	}
	garbage := filepath.Join(t.TempDir(), "state")
	os.WriteFile(garbage, []byte("garbage"), 0o600)
	tests := []struct {
		name    string
		env     map[string]string
		wantErr string
	}{
		{"missing", map[string]string{"ENTRA_TENANT_ID": "", "ENTRA_CLIENT_ID": ""}, "ENTRA_TENANT_ID, ENTRA_CLIENT_ID not set"},
		{"no credential", map[string]string{"ENTRA_CLIENT_SECRET": ""}, "no credential for Entra ID: set one of ENTRA_CLIENT_SECRET, ENTRA_CLIENT_CERTIFICATE or ENTRA_CLIENT_ASSERTION_FILE"},
		{"two credentials", map[string]string{"ENTRA_CLIENT_ASSERTION_FILE": "/nowhere"}, "ENTRA_CLIENT_ASSERTION_FILE and ENTRA_CLIENT_SECRET are set: set only one"},
		{"an assertion file that is not there", map[string]string{"ENTRA_CLIENT_SECRET": "", "ENTRA_CLIENT_ASSERTION_FILE": "/nowhere/token"}, `ENTRA_CLIENT_ASSERTION_FILE "/nowhere/token": no such file or directory`},
		{"an empty assertion file", map[string]string{"ENTRA_CLIENT_SECRET": "", "ENTRA_CLIENT_ASSERTION_FILE": os.DevNull}, "is empty"},
		{"a certificate file that is not one", map[string]string{"ENTRA_CLIENT_SECRET": "", "ENTRA_CLIENT_CERTIFICATE": garbage}, "ENTRA_CLIENT_CERTIFICATE"},
		{"public URL with a path", map[string]string{"PUBLIC_URL": "https://mcp.example/x"}, "PUBLIC_URL"},
		{"public URL over http", map[string]string{"PUBLIC_URL": "http://mcp.example"}, "PUBLIC_URL"},
		{"short session key", map[string]string{"SESSION_KEY": "abcd"}, "SESSION_KEY"},
		{"state file without a session key", map[string]string{"STATE_FILE": "/tmp/x"}, "SESSION_KEY"},
		{"state file with a blank session key", map[string]string{"STATE_FILE": "/tmp/x", "SESSION_KEY": "   "}, "SESSION_KEY"},
		{"damaged state file", map[string]string{"STATE_FILE": garbage, "SESSION_KEY": strings.Repeat("ab", 32)}, "STATE_FILE"},
		{"previous key without a key", map[string]string{"SESSION_KEY_PREVIOUS": strings.Repeat("ab", 32)}, "SESSION_KEY"},
		{"previous key equal to the key", map[string]string{"SESSION_KEY": strings.Repeat("ab", 32), "SESSION_KEY_PREVIOUS": strings.Repeat("ab", 32)}, "SESSION_KEY_PREVIOUS"},
		{"bad TTL", map[string]string{"ACCESS_TOKEN_TTL": "forever"}, "ACCESS_TOKEN_TTL"},
		{"TTL under a second", map[string]string{"ACCESS_TOKEN_TTL": "500ms"}, "ACCESS_TOKEN_TTL"},
		{"TTL over a day", map[string]string{"ACCESS_TOKEN_TTL": "25h"}, "ACCESS_TOKEN_TTL"},
		{"bad rate limit", map[string]string{"RATE_LIMIT": "lots"}, "RATE_LIMIT"},
		{"bad connection limit", map[string]string{"CONNECTION_LIMIT": "-1"}, "CONNECTION_LIMIT"},
		{"allowed tenant that is a domain", map[string]string{"ALLOWED_TENANTS": "contoso.example"}, "ALLOWED_TENANTS"},
		{"refresh TTL beyond Entra's", map[string]string{"REFRESH_TOKEN_TTL": "2400h"}, "REFRESH_TOKEN_TTL"},
		{"allowed origin with a path", map[string]string{"ALLOWED_ORIGINS": "https://ok.example, https://app.example/x"}, "ALLOWED_ORIGINS"},
		{"allowed origin that is not a URL", map[string]string{"ALLOWED_ORIGINS": "app.example"}, "ALLOWED_ORIGINS"},
		{"a trusted proxy that is not an address", map[string]string{"TRUSTED_PROXIES": "10.0.0.0/8, proxy.internal"}, "TRUSTED_PROXIES"},
		{"every address a trusted proxy", map[string]string{"TRUSTED_PROXIES": "0.0.0.0/0"}, "would trust everyone"},
		{"metadata documents neither on nor off", map[string]string{"CLIENT_METADATA_DOCUMENTS": "yes"}, "CLIENT_METADATA_DOCUMENTS"},
		{"loopback documents, not 1 or 0", map[string]string{"CLIENT_METADATA_ALLOW_LOOPBACK": "true"}, "CLIENT_METADATA_ALLOW_LOOPBACK"},
		{"loopback documents on a public server", map[string]string{"CLIENT_METADATA_ALLOW_LOOPBACK": "1", "PUBLIC_URL": "https://mcp.example"}, "CLIENT_METADATA_ALLOW_LOOPBACK"},
		{"loopback documents, listening everywhere", map[string]string{"CLIENT_METADATA_ALLOW_LOOPBACK": "1", "ADDR": ":0"}, "CLIENT_METADATA_ALLOW_LOOPBACK"},
		{"unknown tenant", map[string]string{"ENTRA_TENANT_ID": "not-a-tenant"}, "ENTRA_TENANT_ID"},
		{"unreachable authority", map[string]string{"ENTRA_AUTHORITY": "http://127.0.0.1:1"}, "ENTRA_AUTHORITY"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := map[string]string{}
			for k, v := range base {
				env[k] = v
			}
			for k, v := range tt.env {
				env[k] = v
			}
			var stderr bytes.Buffer
			// Should the configuration be accepted after all, run serves until
			// this deadline, and the test fails rather than hangs.
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			err := run(ctx, []string{"entra-mcp"}, func(k string) string { return env[k] }, io.Discard, &stderr)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || strings.Contains(err.Error(), "\n") {
				t.Errorf("run() = %v, want one line naming %s", err, tt.wantErr)
			}
			if strings.Contains(fmt.Sprint(err)+stderr.String(), f.clientSecret) {
				t.Errorf("the client secret leaked into %v %s", err, stderr.String())
			}
		})
	}
}

func TestLoadConfigNormalizesOrigins(t *testing.T) {
	env := map[string]string{"ENTRA_TENANT_ID": "t", "ENTRA_CLIENT_ID": "c", "ENTRA_CLIENT_SECRET": "s",
		"ALLOWED_ORIGINS": " https://App.Example/ ,http://intranet:8080,https://b.example:443", "PUBLIC_URL": "https://MCP.example:443/"}
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	// As browsers send origins: lower case, no default port, no slash.
	if !slices.Equal(cfg.allowedOrigins, []string{"https://app.example", "http://intranet:8080", "https://b.example"}) || cfg.publicURL != "https://mcp.example" {
		t.Errorf("allowedOrigins = %q, publicURL = %q", cfg.allowedOrigins, cfg.publicURL)
	}
}

func TestRunServesAndShutsDown(t *testing.T) {
	// run needs its public URL before it listens; take a free port first.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	publicURL := "http://" + addr
	f := newFakeEntra(t, fakeEntraOptions{redirectURI: publicURL + "/auth/callback"})
	stateFile := filepath.Join(t.TempDir(), "state")
	env := map[string]string{
		"ENTRA_TENANT_ID": f.tenantID, "ENTRA_CLIENT_ID": f.clientID, "ENTRA_CLIENT_SECRET": f.clientSecret,
		"ENTRA_AUTHORITY": f.URL, "GRAPH_URL": f.URL, "ADDR": addr, "PUBLIC_URL": publicURL,
		"STATE_FILE": stateFile, "SESSION_KEY": strings.Repeat("ab", 32),
	}
	ctx, cancel := context.WithCancel(t.Context())
	logs, logWriter := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"entra-mcp"}, func(k string) string { return env[k] }, io.Discard, logWriter)
		logWriter.Close()
	}()

	// Once listening, one log line says which URL to give the client.
	lines := bufio.NewScanner(logs)
	if !lines.Scan() {
		t.Fatalf("no log line from run: %v", <-done)
	}
	if first := lines.Text(); !strings.Contains(first, "url="+publicURL+"/mcp") {
		t.Errorf("first log line = %q, want the URL to give the client", first)
	}
	go io.Copy(io.Discard, logs)

	// Request lines and headers are bounded.
	huge := http.Header{"X-Padding": {strings.Repeat("x", 100<<10)}}
	req, _ := http.NewRequestWithContext(t.Context(), "GET", publicURL+"/.well-known/oauth-authorization-server", nil)
	req.Header = huge
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("a request with 100 KB of headers = %v, %v; want 431", resp, err)
	} else {
		resp.Body.Close()
	}

	// A client signs in through the real server and holds a stream open.
	client := &testEnv{url: publicURL, entra: f}
	signedIn := client.signIn(t, signInOptions{})
	conn := client.connect(t, signedIn.AccessToken)
	var result toolResult
	conn.call(t, "tools/call", `{"name":"getUserDetails"}`, &result)
	if result.IsError {
		t.Fatalf("tools/call through run = %+v", result)
	}

	// Shutting down ends the open stream and returns cleanly.
	cancel()
	if _, err := conn.events.next(); !errors.Is(err, io.EOF) {
		t.Errorf("stream after shutdown: %v, want EOF", err)
	}
	if err := <-done; err != nil {
		t.Errorf("run() after cancel = %v, want nil", err)
	}
	// The registration reached its file, by the time run returned at the latest.
	key, _ := parseSessionKey("SESSION_KEY", env["SESSION_KEY"])
	clients, _, _, err := readStateFile(clientsFile(stateFile), newSessionCodec(publicURL, time.Now, key).keys, partClients)
	if err != nil || len(clients.Clients) != 1 || clients.Clients[0].ID != signedIn.clientID {
		t.Errorf("registrations saved by run: %+v, %v; want the one client", clients.Clients, err)
	}
}

func TestShutdownClosesStreams(t *testing.T) {
	env := newTestEnv(t)
	conn := env.connect(t, env.signIn(t, signInOptions{}).AccessToken)
	env.srv.closeStreams()
	if _, err := conn.events.next(); !errors.Is(err, io.EOF) {
		t.Errorf("stream after shutdown: %v, want EOF", err)
	}
}

// ---- Hardening ----

// TestNothingLeaks runs a sign-in, a refresh, tool calls that refresh the
// Entra token, failures and a sign-out with the log captured, and checks that
// no secret, token, code, verifier, state, nonce or cookie of any of it
// reached a log line.
func TestNothingLeaks(t *testing.T) {
	env := newTestEnv(t)
	env.entra.set(func() { env.entra.expiresIn = 600 })
	c := env.newClient(t, `"token_endpoint_auth_method":"client_secret_post","client_name":"leak test"`)
	b := newBrowser(t)
	page := readBody(t, b.get(t, env.url+c.authorizeURL(nil)))
	consentID := consentIDFrom(t, page)
	entraURL := location(t, b.postForm(t, env.url+"/authorize", url.Values{"consent_id": {consentID}, "decision": {"approve"}}), http.StatusSeeOther)
	callback := location(t, b.get(t, entraURL.String()), http.StatusFound)
	code := location(t, b.get(t, callback.String()), http.StatusFound).Query().Get("code")
	tokens := env.redeem(t, c, code)
	wantOAuthError(t, env.postForm(t, "/token", url.Values{"grant_type": {"authorization_code"}, "code": {code}, "client_id": {c.id},
		"client_secret": {c.secret}, "code_verifier": {c.verifier}, "redirect_uri": {c.redirectURI}}, nil), 400, "invalid_grant") // reused: logged
	wantOAuthError(t, env.postForm(t, "/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {tokens.RefreshToken},
		"client_id": {c.id}, "client_secret": {c.secret + "x"}}, nil), 401, "invalid_client")

	c2 := env.newClient(t, `"token_endpoint_auth_method":"client_secret_post"`)
	tokens2 := env.redeem(t, c2, env.codeFor(t, c2))
	mcp := &mcpClient{env: env, token: tokens2.AccessToken}
	mcp.initialize(t, "2025-11-25")
	env.clock.advance(10 * time.Minute) // the tool call refreshes the Entra token
	var result toolResult
	mcp.call(t, "tools/call", `{"name":"getUserDetails"}`, &result)
	env.entra.set(func() { env.entra.refreshRevoked = true })
	env.clock.advance(10 * time.Minute) // and now Entra refuses: logged, with Entra's ids
	mcp.post(t, `{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"getUserDetails"}}`, nil)
	env.postForm(t, "/revoke", url.Values{"token": {tokens2.RefreshToken}, "client_id": {c2.id}, "client_secret": {c2.secret}}, nil)

	cookies := b.client.Jar.Cookies(&url.URL{Scheme: "http", Host: strings.TrimPrefix(env.url, "http://")})
	secrets := map[string]string{
		"Entra client secret":   env.entra.clientSecret,
		"client secret":         c.secret,
		"PKCE verifier":         c.verifier,
		"consent id":            consentID,
		"browser cookie":        cookies[0].Value,
		"our state at Entra":    entraURL.Query().Get("state"),
		"our nonce":             entraURL.Query().Get("nonce"),
		"Entra's code":          callback.Query().Get("code"),
		"our code":              code,
		"access token":          tokens.AccessToken,
		"refresh token":         tokens.RefreshToken,
		"session id":            tokenClaims(t, tokens.AccessToken)["sid"].(string),
		"Entra access token":    env.entra.lastAccessToken(),
		"Entra refresh token":   env.entra.lastRefreshToken(),
		"Entra refused refresh": env.entra.refreshes[len(env.entra.refreshes)-1].Get("refresh_token"),
		"Entra id_token":        env.entra.lastIDToken,
		"user's name":           env.entra.user.name,
		"user's UPN":            env.entra.user.upn,
		"user's object id":      env.entra.user.oid,
		"Entra's error text":    "The provided grant has expired",
	}
	logs := env.logs.String()
	if !strings.Contains(logs, "aadsts=50173") {
		t.Fatalf("the run did not log what it should have; the check below would prove nothing:\n%s", logs)
	}
	for name, secret := range secrets {
		if len(secret) < 8 {
			t.Fatalf("%s %q: not collected", name, secret)
		}
		if strings.Contains(logs, secret) {
			t.Errorf("the log holds the %s", name)
		}
	}
}

func TestHostileInput(t *testing.T) {
	env := newTestEnv(t)
	c := &mcpClient{env: env, token: env.signIn(t, signInOptions{}).AccessToken}
	c.initialize(t, "2025-11-25")
	big := strings.Repeat("x", 70<<10)
	tests := []struct {
		name, method, path, body string
		header                   http.Header
		wantStatus               int
		wantError                string // OAuth error, or JSON-RPC code as text
	}{
		{"registration too large", "POST", "/register", `{"client_name":"` + big + `"}`, nil, 413, "invalid_request"},
		{"registration not UTF-8", "POST", "/register", "{\"redirect_uris\":[\"https://a.example/\xff\"]}", nil, 400, "invalid_client_metadata"},
		{"token request too large", "POST", "/token", "grant_type=" + big, http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}, 413, "invalid_request"},
		{"revocation too large", "POST", "/revoke", "token=" + big, http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}, 413, "invalid_request"},
		{"JSON-RPC not UTF-8", "POST", "/mcp", "{\"jsonrpc\":\"2.0\",\"id\":\"\xff\",\"method\":\"ping\"}", c.headers(nil), 400, "-32700"},
		{"JSON-RPC nested too deep", "POST", "/mcp", strings.Repeat("[", 20000) + strings.Repeat("]", 20000), c.headers(nil), 400, "-32700"},
		{"JSON-RPC id too large a number", "POST", "/mcp", `{"jsonrpc":"2.0","id":1e999,"method":"ping"}`, c.headers(nil), 400, "-32600"},
		{"JSON-RPC params of the wrong type", "POST", "/mcp", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["getUserDetails"]}`, c.headers(nil), 200, "-32602"},
		{"authorization request too long", "GET", "/authorize?state=" + big, "", nil, 414, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := env.do(t, tt.method, tt.path, strings.NewReader(tt.body), tt.header)
			body := readBody(t, resp)
			if resp.StatusCode != tt.wantStatus || !strings.Contains(body, tt.wantError) {
				t.Errorf("%s %s = %d %.200s, want %d with %s", tt.method, tt.name, resp.StatusCode, body, tt.wantStatus, tt.wantError)
			}
		})
	}
}

func TestStalledStreamIsClosed(t *testing.T) {
	env := newTestEnv(t)
	env.srv.streamStall = time.Millisecond
	tokens := env.signIn(t, signInOptions{})
	sess, _ := env.srv.sessions.get(tokenClaims(t, tokens.AccessToken)["sid"].(string))
	// A stream whose client stopped reading: its queue is full and nothing
	// drains it.
	st := &stream{out: make(chan []byte, 1), done: make(chan struct{})}
	st.out <- []byte(`{}`)
	if err := env.srv.addMCPSession(&mcpSession{id: "stalled", owner: sess.id, stream: st}, sess); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute) // a regression fails, not hangs
	defer cancel()
	h := bearer(tokens.AccessToken)
	h.Set("Content-Type", "application/json")
	if got := postRaw(ctx, env.url+"/message?sessionId=stalled", h, `{"jsonrpc":"2.0","id":1,"method":"ping"}`); !strings.HasPrefix(got, "503 ") {
		t.Errorf("POST to a stalled stream's session = %s, want 503", got)
	}
	select {
	case <-st.done:
	default:
		t.Errorf("the stalled stream was not closed")
	}
}

// CORS, for browser-based clients.

func TestCORS(t *testing.T) {
	env := newTestEnv(t, func(c *config) { c.allowedOrigins = []string{"https://app.example"} })
	token := env.signIn(t, signInOptions{}).AccessToken
	preflight := func(path, origin string) *http.Response {
		return env.do(t, "OPTIONS", path, nil, http.Header{"Origin": {origin}, "Access-Control-Request-Method": {"POST"},
			"Access-Control-Request-Headers": {"authorization, content-type, mcp-protocol-version"}})
	}
	tests := []struct {
		name, method, path, origin string
		header                     http.Header
		wantStatus                 int
		wantACAO                   string
	}{
		{"preflight of /mcp, from Inspector", "OPTIONS", "/mcp", "http://localhost:6274", nil, 204, "http://localhost:6274"},
		{"preflight of /mcp, from an allowed app", "OPTIONS", "/mcp", "https://app.example", nil, 204, "https://app.example"},
		{"preflight of /message", "OPTIONS", "/message", "http://127.0.0.1:6274", nil, 204, "http://127.0.0.1:6274"},
		{"preflight of /token, from anywhere", "OPTIONS", "/token", "https://any.example", nil, 204, "*"},
		{"preflight of /register", "OPTIONS", "/register", "https://any.example", nil, 204, "*"},
		{"preflight of the metadata", "OPTIONS", "/.well-known/oauth-protected-resource/mcp", "https://any.example", nil, 204, "*"},
		{"preflight of /mcp, from a foreign page", "OPTIONS", "/mcp", "https://evil.example", nil, 403, ""},
		{"a 401 is readable", "POST", "/mcp", "http://localhost:6274", http.Header{}, 401, "http://localhost:6274"},
		{"an answer is readable", "POST", "/mcp", "http://localhost:6274", bearer(token), 200, "http://localhost:6274"},
		{"metadata is readable", "GET", "/.well-known/oauth-authorization-server", "https://any.example", http.Header{}, 200, "*"},
		{"a token error is readable", "POST", "/token", "https://any.example", http.Header{}, 401, "*"},
		{"/authorize is not fetched", "GET", "/authorize", "https://any.example", http.Header{}, 400, ""},
		{"/auth/callback is not fetched", "GET", "/auth/callback", "https://any.example", http.Header{}, 400, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var resp *http.Response
			if tt.method == "OPTIONS" {
				resp = preflight(tt.path, tt.origin)
			} else {
				h := tt.header.Clone()
				h.Set("Origin", tt.origin)
				h.Set("Accept", "application/json, text/event-stream")
				body := `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}`
				if tt.path == "/token" {
					h.Set("Content-Type", "application/x-www-form-urlencoded")
					body = "grant_type=password"
				}
				resp = env.do(t, tt.method, tt.path, strings.NewReader(body), h)
			}
			if resp.StatusCode != tt.wantStatus || resp.Header.Get("Access-Control-Allow-Origin") != tt.wantACAO {
				t.Fatalf("%s %s from %s = %d, ACAO %q; want %d, %q", tt.method, tt.path, tt.origin, resp.StatusCode, resp.Header.Get("Access-Control-Allow-Origin"), tt.wantStatus, tt.wantACAO)
			}
			if tt.wantACAO != "" {
				for _, h := range []string{"WWW-Authenticate", "Mcp-Session-Id", "Mcp-Protocol-Version", "Retry-After"} {
					if !strings.Contains(resp.Header.Get("Access-Control-Expose-Headers"), h) {
						t.Errorf("Access-Control-Expose-Headers = %q, want %s among them", resp.Header.Get("Access-Control-Expose-Headers"), h)
					}
				}
			}
			if mcp := tt.path == "/mcp" || tt.path == "/message"; mcp && resp.Header.Get("Vary") != "Origin" {
				t.Errorf("Vary = %q, want Origin: the answer depends on it", resp.Header.Get("Vary"))
			}
			// MCP 2026-07-28 clients in a browser send Mcp-Method and Mcp-Name too.
			if allowed := resp.Header.Get("Access-Control-Allow-Headers"); tt.method == "OPTIONS" && tt.wantStatus == 204 &&
				!(strings.Contains(allowed, "Mcp-Protocol-Version") && strings.Contains(allowed, "Mcp-Method") && strings.Contains(allowed, "Mcp-Name")) {
				t.Errorf("Access-Control-Allow-Headers = %q", resp.Header.Get("Access-Control-Allow-Headers"))
			}
		})
	}
}

// Rate limits.

func TestRateLimits(t *testing.T) {
	t.Run("the default lets an automated test sign in dozens of times a minute", func(t *testing.T) {
		required := map[string]string{"ENTRA_TENANT_ID": "t", "ENTRA_CLIENT_ID": "c", "ENTRA_CLIENT_SECRET": "s"}
		defaults, err := loadConfig(func(k string) string { return required[k] })
		if err != nil {
			t.Fatal(err)
		}
		env := newTestEnv(t, func(c *config) { c.rateLimit = defaults.rateLimit })
		for range 40 {
			env.signIn(t, signInOptions{}) // each: /register, /authorize twice, /token
		}
	})

	env := newTestEnv(t, func(c *config) { c.rateLimit = 3 })
	c := env.newClient(t, `"token_endpoint_auth_method":"none"`) // the first of 3 registrations
	from := func(ip, method, target, body string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(method, target, strings.NewReader(body))
		r.RemoteAddr = ip + ":1234"
		r.Header.Set("Content-Type", map[string]string{"/register": "application/json", "/token": "application/x-www-form-urlencoded", "/revoke": "application/x-www-form-urlencoded"}[target])
		rec := httptest.NewRecorder()
		env.srv.ServeHTTP(rec, r)
		return rec
	}
	register := `{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`
	for range 2 {
		env.newClient(t, `"token_endpoint_auth_method":"none"`)
	}
	for _, tt := range []struct {
		method, target, body, wantType string
		left                           int // of the burst of 3
	}{
		{"POST", "/register", register, "application/json", 0}, // spent on the 3 registrations above
		{"GET", c.authorizeURL(nil), "", "text/html; charset=utf-8", 3},
		{"POST", "/token", "grant_type=refresh_token&refresh_token=x&client_id=" + c.id, "application/json", 3},
		{"POST", "/revoke", "token=x&client_id=" + c.id, "application/json", 3},
		{"GET", "/auth/callback?state=x&code=y", "", "text/html; charset=utf-8", 3},
	} {
		for range tt.left {
			from("127.0.0.1", tt.method, tt.target, tt.body)
		}
		rec := from("127.0.0.1", tt.method, tt.target, tt.body)
		if rec.Code != http.StatusTooManyRequests || rec.Header().Get("Retry-After") == "" || rec.Header().Get("Content-Type") != tt.wantType {
			t.Errorf("%s %s past the limit = %d %q, Retry-After %q; want 429 %s", tt.method, tt.target, rec.Code, rec.Header().Get("Content-Type"), rec.Header().Get("Retry-After"), tt.wantType)
		}
		if tt.wantType == "application/json" && !strings.Contains(rec.Body.String(), `"error":"temporarily_unavailable"`) {
			t.Errorf("429 body = %s, want an OAuth error", rec.Body)
		}
		if rec := from("192.0.2.7", tt.method, tt.target, tt.body); rec.Code == http.StatusTooManyRequests {
			t.Errorf("%s %s from another address = 429, want its own limit", tt.method, tt.target)
		}
	}
	env.clock.advance(time.Minute)
	if rec := from("127.0.0.1", "POST", "/register", register); rec.Code != http.StatusCreated {
		t.Errorf("POST /register a minute later = %d, want 201", rec.Code)
	}
}

// TestSlowBodies trickles request bodies, a byte at a time, as a client
// holding connections open would, to the server as run configures it (the
// read deadline made short): each is cut once the deadline passes. A tool
// call that takes longer than the deadline, its body long read, is not.
func TestSlowBodies(t *testing.T) {
	env := newTestEnv(t)
	hs := newHTTPServer(env.cfg, env.srv, env.logger)
	if hs.ReadTimeout <= 0 || hs.ReadTimeout > time.Minute {
		t.Errorf("the server's read deadline is %v, want a minute at most", hs.ReadTimeout)
	}
	hs.ReadTimeout = 200 * time.Millisecond
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { hs.Serve(ln); close(served) }()
	defer func() { hs.Close(); <-served }()
	addr := ln.Addr().String()
	for _, target := range []string{"POST /register", "POST /token", "POST /revoke", "POST /authorize", "POST /mcp", "POST /message?sessionId=x"} {
		t.Run(target, func(t *testing.T) {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			fmt.Fprintf(conn, "%s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{", target, addr)
			// Should the server wait for ever, the test fails, not hangs.
			conn.SetReadDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.Copy(io.Discard, conn); err != nil && !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("%s with a trickling body: %v, want the server to close the connection", target, err)
			}
		})
	}

	t.Run("an SSE stream, which has no body, outlives the deadline", func(t *testing.T) {
		conn := (&testEnv{url: "http://" + addr, entra: env.entra}).connect(t, env.signIn(t, signInOptions{}).AccessToken)
		<-time.After(3 * hs.ReadTimeout) // what the test waits for is time itself: the deadline, passing
		var result struct{}
		conn.call(t, "ping", "", &result)
	})

	t.Run("a tool call slower than the deadline", func(t *testing.T) {
		c := &mcpClient{env: env, token: env.signIn(t, signInOptions{}).AccessToken}
		c.initialize(t, "2025-11-25")
		arrived, hold := make(chan struct{}), make(chan struct{})
		env.entra.set(func() { env.entra.graphArrived, env.entra.graphHold = arrived, hold })
		answer := make(chan string, 1)
		go func() {
			answer <- postRaw(t.Context(), "http://"+addr+"/mcp", c.headers(nil), `{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"getUserDetails"}}`)
		}()
		<-arrived
		<-time.After(3 * hs.ReadTimeout) // what the test waits for is time itself: the deadline, passing
		close(hold)
		if got := <-answer; !strings.HasPrefix(got, "200 ") || !strings.Contains(got, "Adele Vance") {
			t.Errorf("tools/call slower than the read deadline = %s, want its result", got)
		}
	})
}

// TestConnectionLimit holds one address's share of connections: the next is
// refused with 503, those open are still served, and a closed one frees its
// place.
func TestConnectionLimit(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "served") })}
	served := make(chan struct{})
	go func() { hs.Serve(limitConnections(ln, 2)); close(served) }()
	defer func() { hs.Close(); <-served }()
	get := func(conn net.Conn, close bool) string {
		t.Helper()
		h := ""
		if close {
			h = "Connection: close\r\n"
		}
		fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: x\r\n%s\r\n", h)
		conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			return err.Error()
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if close {
			io.Copy(io.Discard, conn) // until the server has closed it, and given its place back
		}
		return fmt.Sprintf("%d %s", resp.StatusCode, body)
	}
	dial := func() net.Conn {
		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	first, second := dial(), dial()
	if got := get(first, false); got != "200 served" {
		t.Fatalf("first connection: %s", got)
	}
	if got := get(dial(), false); !strings.HasPrefix(got, "503") {
		t.Errorf("a third connection from the same address = %s, want 503", got)
	}
	if got := get(second, true); got != "200 served" {
		t.Errorf("an open connection past the limit = %s, want it served", got)
	}
	if got := get(dial(), false); got != "200 served" {
		t.Errorf("a new connection once one closed = %s, want it served", got)
	}
}

// TestTrustedProxies: behind TRUSTED_PROXIES, the client address is the one
// the proxies name in X-Forwarded-For, read from the right, where the proxies
// wrote it; from anyone else, the header is ignored.
func TestTrustedProxies(t *testing.T) {
	s := &server{cfg: config{trustedProxies: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}}}
	for _, tt := range []struct {
		peer, forwarded, want string
	}{
		{"10.1.1.1:5000", "203.0.113.7", "203.0.113.7"},
		{"10.1.1.1:5000", "198.51.100.1, 203.0.113.7", "203.0.113.7"},          // the client's own claim comes first, and is ignored
		{"10.1.1.1:5000", "203.0.113.7, 10.2.2.2", "203.0.113.7"},              // through two proxies
		{"[fd00::1]:5000", "2001:db8:1:2::5", "2001:db8:1:2::/64"},             // counted by /64, as always
		{"10.1.1.1:5000", "203.0.113.7, not-an-address, 10.2.2.2", "10.1.1.1"}, // a hop garbled: the proxy itself
		{"10.1.1.1:5000", "", "10.1.1.1"},
		{"10.1.1.1:5000", "203.0.113.7:4711", "203.0.113.7"}, // with a port, as Azure Application Gateway writes it
		{"10.1.1.1:5000", "[2001:db8::1]:4711", "2001:db8::/64"},
		{"10.1.1.1:5000", "[2001:db8::1]", "2001:db8::/64"},
		{"10.1.1.1:5000", "203.0.113.7,", "203.0.113.7"},
		{"[::ffff:10.1.1.1]:5000", "203.0.113.7", "203.0.113.7"}, // the proxy's address, IPv4-mapped
		{"192.0.2.9:5000", "203.0.113.7", "192.0.2.9"},           // not a trusted proxy: its header means nothing
		{"127.0.0.1:5000", "203.0.113.7", "loopback"},
	} {
		r := httptest.NewRequest("GET", "/", nil)
		r.RemoteAddr = tt.peer
		if tt.forwarded != "" {
			r.Header.Set("X-Forwarded-For", tt.forwarded)
		}
		if got := s.clientAddressOf(r); got != tt.want {
			t.Errorf("from %s, X-Forwarded-For %q: client address %q, want %q", tt.peer, tt.forwarded, got, tt.want)
		}
	}

	t.Run("TRUSTED_PROXIES takes addresses and ranges", func(t *testing.T) {
		cfg, err := loadConfig(envOf(map[string]string{"ENTRA_TENANT_ID": "t", "ENTRA_CLIENT_ID": "c", "ENTRA_CLIENT_SECRET": "s",
			"TRUSTED_PROXIES": "10.0.0.1, 192.168.7.0/16,fd00::/8, ::ffff:172.16.0.0/108"}))
		if err != nil || fmt.Sprint(cfg.trustedProxies) != "[10.0.0.1/32 192.168.0.0/16 fd00::/8 172.16.0.0/12]" {
			t.Errorf("trusted proxies = %v, %v", cfg.trustedProxies, err)
		}
	})
	t.Run("the rate limits count the forwarded address", func(t *testing.T) {
		env := newTestEnv(t, func(c *config) {
			c.rateLimit, c.trustedProxies = 1, []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
		})
		register := func(forwardedFor string) int {
			resp := env.do(t, "POST", "/register", strings.NewReader(`{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`),
				http.Header{"Content-Type": {"application/json"}, "X-Forwarded-For": {forwardedFor}})
			return resp.StatusCode
		}
		if got := []int{register("203.0.113.7"), register("203.0.113.7"), register("198.51.100.1")}; !slices.Equal(got, []int{201, 429, 201}) {
			t.Errorf("registrations through the proxy = %v, want 201 429 201: one limit per forwarded address", got)
		}
	})
}

func TestRateLimiterAddresses(t *testing.T) {
	for _, tt := range []struct{ a, b string }{
		{"[2001:db8:1:2::1]:1000", "[2001:db8:1:2:ffff::9]:2000"}, // one /64
		{"[::ffff:192.0.2.1]:1", "192.0.2.1:2"},                   // IPv4, mapped or not
		{"[fe80::1%eth0]:1", "[fe80::1]:2"},                       // zones do not count
		{"127.0.0.1:1", "127.9.9.9:2"},                            // loopback is one machine, this one
		{"[::1]:1", "127.0.0.1:2"},
	} {
		if clientAddress(tt.a) != clientAddress(tt.b) {
			t.Errorf("%s and %s count apart: %s, %s", tt.a, tt.b, clientAddress(tt.a), clientAddress(tt.b))
		}
	}
	// When the limiter is full, new addresses share one bucket.
	clock := &testClock{t: time.Unix(1e9, 0)}
	l := newRateLimiter(clock.now, 2)
	for i := range maxBuckets {
		l.allow(fmt.Sprint("token ", i))
		l.allow(fmt.Sprint("token ", i))
	}
	allowed := 0
	for i := range 10 {
		if _, ok := l.allow(fmt.Sprint("token new", i)); ok {
			allowed++
		}
	}
	if allowed != 2 {
		t.Errorf("10 new addresses on a full limiter got %d requests through, want 2: one shared bucket", allowed)
	}
}

// Bounded state.

func TestBoundedState(t *testing.T) {
	env := newTestEnv(t)
	c := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	// authorize opens a consent page from addr, in a new browser each time,
	// and returns its consent id.
	authorize := func(addr string) string {
		rec := httptest.NewRecorder()
		r := httptest.NewRequest("GET", c.authorizeURL(nil), nil)
		r.RemoteAddr = addr + ":1234"
		env.srv.ServeHTTP(rec, r)
		if rec.Code != http.StatusOK {
			t.Fatalf("GET /authorize from %s = %d, want 200", addr, rec.Code)
		}
		return consentIDFrom(t, rec.Body.String())
	}
	pending := func(id string) bool { _, ok := env.srv.consents.get(hashKey(id)); return ok }

	t.Run("abandoned authorizations keep one address to its share, and lock nobody out", func(t *testing.T) {
		var ids []string
		for range pendingPerAddress + 10 {
			ids = append(ids, authorize("192.0.2.1"))
		}
		if n := env.srv.consents.len(); n != pendingPerAddress {
			t.Errorf("%d pending consents kept from one address, want its share, %d", n, pendingPerAddress)
		}
		if pending(ids[9]) || !pending(ids[10]) || !pending(ids[len(ids)-1]) {
			t.Errorf("the address's oldest consents did not make room for its newest")
		}
		other := authorize("192.0.2.2")
		capAt(env.srv.consents, env.srv.consents.len()) // full: the address holding the most makes room
		third := authorize("198.51.100.7")
		if !pending(other) || !pending(third) || pending(ids[10]) || !pending(ids[11]) {
			t.Errorf("a full store dropped the wrong consent")
		}
		capAt(env.srv.consents, maxPending)
		env.clock.advance(consentTTL) // they expire...
		if id := authorize("192.0.2.1"); !pending(id) || pending(ids[len(ids)-1]) {
			t.Errorf("after the consent lifetime: the old consent pending %v, a new one %v; want only the new", pending(ids[len(ids)-1]), pending(id))
		}
	})
	t.Run("a browser starting the same client's sign-in again replaces its consent", func(t *testing.T) {
		b := newBrowser(t)
		first := consentIDFrom(t, readBody(t, b.get(t, env.url+c.authorizeURL(nil))))
		second := consentIDFrom(t, readBody(t, b.get(t, env.url+c.authorizeURL(nil))))
		if pending(first) || !pending(second) {
			t.Errorf("after a second authorization from one browser: first pending %v, second %v; want only the second", pending(first), pending(second))
		}
	})
	t.Run("sign-ins at Entra keep one address to its share", func(t *testing.T) {
		for range pendingPerAddress + 5 {
			b := newBrowser(t)
			id := consentIDFrom(t, readBody(t, b.get(t, env.url+c.authorizeURL(nil))))
			if resp := b.postForm(t, env.url+"/authorize", url.Values{"consent_id": {id}, "decision": {"approve"}}); resp.StatusCode != http.StatusSeeOther {
				t.Fatalf("approving = %d, want 303 to Entra", resp.StatusCode)
			}
		}
		if n := env.srv.flows.len(); n != pendingPerAddress {
			t.Errorf("%d sign-ins pending at Entra from one address, want its share, %d", n, pendingPerAddress)
		}
	})
	t.Run("codes stop at the cap, and the client hears of it", func(t *testing.T) {
		b := newBrowser(t)
		callback := env.toCallback(t, b, c)
		capAt(env.srv.codes, 0)
		u := location(t, b.get(t, callback), http.StatusFound)
		if u.Query().Get("error") != "temporarily_unavailable" || u.Query().Get("state") != "client-state" {
			t.Errorf("callback past the cap redirected to %s, want error=temporarily_unavailable", u)
		}
		capAt(env.srv.codes, maxPending)
	})
	t.Run("registrations stop at the cap", func(t *testing.T) {
		capAt(env.srv.clients, env.srv.clients.len())
		resp := env.do(t, "POST", "/register", strings.NewReader(`{"redirect_uris":["https://a.example/cb"]}`), nil)
		wantOAuthError(t, resp, http.StatusServiceUnavailable, "temporarily_unavailable")
		if resp.Header.Get("Retry-After") == "" {
			t.Errorf("503 without Retry-After")
		}
		capAt(env.srv.clients, maxClients)
	})
	t.Run("sessions stop at the cap", func(t *testing.T) {
		code := env.codeFor(t, c)
		capAt(env.srv.sessions, env.srv.sessions.len())
		resp := env.postForm(t, "/token", url.Values{"grant_type": {"authorization_code"}, "code": {code},
			"redirect_uri": {c.redirectURI}, "client_id": {c.id}, "code_verifier": {c.verifier}}, nil)
		wantOAuthError(t, resp, http.StatusServiceUnavailable, "temporarily_unavailable")
		capAt(env.srv.sessions, maxSessions)
		env.redeem(t, c, code) // the code was not used up: the client may try again
	})
	t.Run("MCP sessions stop at the cap", func(t *testing.T) {
		token := env.signIn(t, signInOptions{}).AccessToken
		capAt(env.srv.mcp, env.srv.mcp.len()+1)
		(&mcpClient{env: env, token: token}).initialize(t, "2025-11-25")
		resp := (&mcpClient{env: env, token: token}).post(t, `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}`, nil)
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" || resp.Header.Get("Mcp-Session-Id") != "" {
			t.Errorf("initialize past the cap = %d, want 503 with Retry-After and no session", resp.StatusCode)
		}
		if resp := env.do(t, "GET", "/sse", nil, bearer(token)); resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("GET /sse past the cap = %d, want 503", resp.StatusCode)
		}
	})
}

// capAt sets the cap of a store.
func capAt[V any](m *ttlMap[V], n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.max = n
}

// TestSignInsPerUserAtOnce starts many sign-ins of one user at the same
// time: the share holds however they race.
func TestSignInsPerUserAtOnce(t *testing.T) {
	env := newTestEnv(t)
	c := env.newClient(t, `"token_endpoint_auth_method":"none"`)
	client, _ := env.srv.clients.get(c.id)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range 4 * maxSessionsPerUser {
		wg.Go(func() {
			sess := &session{id: newSecret(), subject: "one user", clientID: c.id, scope: "mcp", resource: env.url}
			<-start
			env.srv.startSession(client, sess, sess.resource)
		})
	}
	close(start)
	wg.Wait()
	n := 0
	env.srv.sessions.each(func(sess *session, _ time.Time) {
		if sess.subject == "one user" && !sess.ended.Load() {
			n++
		}
	})
	if n != maxSessionsPerUser {
		t.Errorf("%d sign-ins of one user after %d at once, want the share, %d", n, 4*maxSessionsPerUser, maxSessionsPerUser)
	}
}

// TestSignInsPerUser signs one user in once more than their share: the
// sign-in refreshed longest ago ends, and another user's is untouched.
func TestSignInsPerUser(t *testing.T) {
	env := newTestEnv(t)
	other := env.signInAnotherUser(t)
	first := env.signIn(t, signInOptions{})
	env.clock.advance(time.Second)
	second := env.signIn(t, signInOptions{})
	env.clock.advance(time.Second)
	var refreshed tokenResponse // first, in use, refreshes: second is now the oldest
	decodeJSON(t, env.refresh(t, first.RefreshToken, first.clientID), http.StatusOK, &refreshed)
	for range maxSessionsPerUser - 2 {
		env.clock.advance(time.Second)
		env.signIn(t, signInOptions{})
	}
	last := env.signIn(t, signInOptions{}) // one more than the share
	for name, tt := range map[string]struct {
		token string
		want  int
	}{"the oldest": {second.AccessToken, 401}, "the refreshed": {refreshed.AccessToken, 200}, "the newest": {last.AccessToken, 200}, "another user's": {other.AccessToken, 200}} {
		if resp := env.do(t, "GET", "/sse", nil, bearer(tt.token)); resp.StatusCode != tt.want {
			t.Errorf("GET /sse with %s sign-in's token = %d, want %d", name, resp.StatusCode, tt.want)
		}
	}
}

// TestMCPSessionsPerUserAtOnce opens many MCP sessions for one user at the
// same time: the share holds however they race.
func TestMCPSessionsPerUserAtOnce(t *testing.T) {
	env := newTestEnv(t)
	sess, _ := env.srv.sessions.get(tokenClaims(t, env.signIn(t, signInOptions{}).AccessToken)["sid"].(string))
	var wg sync.WaitGroup
	start := make(chan struct{}) // all at once, as far as the scheduler lets them
	for range 4 * maxMCPSessionsPerUser {
		wg.Go(func() { <-start; env.srv.addMCPSession(&mcpSession{id: newSecret(), owner: sess.id}, sess) })
	}
	close(start)
	wg.Wait()
	n := 0
	env.srv.mcp.each(func(ms *mcpSession, _ time.Time) {
		if ms.user == sess.subject {
			n++
		}
	})
	if n != maxMCPSessionsPerUser {
		t.Errorf("%d MCP sessions for one user after %d at once, want the share, %d", n, 4*maxMCPSessionsPerUser, maxMCPSessionsPerUser)
	}
}

// TestMCPSessionsPerUser fills one user's share of MCP sessions over two
// sign-ins: the user's oldest makes room, and another user is untouched.
func TestMCPSessionsPerUser(t *testing.T) {
	env := newTestEnv(t)
	other := &mcpClient{env: env, token: env.signInAnotherUser(t).AccessToken}
	other.initialize(t, "2025-11-25")
	tokens := []string{env.signIn(t, signInOptions{}).AccessToken, env.signIn(t, signInOptions{}).AccessToken}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second) // a stream left open fails the test, not hangs it
	defer cancel()
	stream := env.connectUntil(t, ctx, tokens[0]) // the oldest, on HTTP+SSE
	env.clock.advance(time.Second)
	var mine []*mcpClient
	for i := range maxMCPSessionsPerUser {
		c := &mcpClient{env: env, token: tokens[i%2]}
		c.initialize(t, "2025-11-25")
		env.clock.advance(time.Second)
		mine = append(mine, c)
	}
	if _, err := stream.events.next(); !errors.Is(err, io.EOF) || ctx.Err() != nil {
		t.Errorf("the oldest session's stream: %v (%v), want EOF from the server: it made room", err, ctx.Err())
	}
	mine = append(mine, &mcpClient{env: env, token: tokens[1]})
	mine[len(mine)-1].initialize(t, "2025-11-25")
	ping := `{"jsonrpc":"2.0","id":1,"method":"ping"}`
	if resp := mine[0].post(t, ping, nil); resp.StatusCode != http.StatusNotFound {
		t.Errorf("the oldest of the Streamable HTTP sessions = %d, want 404: it made room next", resp.StatusCode)
	}
	for _, c := range []*mcpClient{mine[1], mine[len(mine)-1], other} {
		if resp := c.post(t, ping, nil); resp.StatusCode != http.StatusOK {
			t.Errorf("a newer session, or another user's = %d, want 200", resp.StatusCode)
		}
	}
}

// TestStreamsLeaveNothingBehind opens and closes many streams, and checks that
// goroutines, descriptors and sessions come back to where they were.
func TestStreamsLeaveNothingBehind(t *testing.T) {
	env := newTestEnv(t)
	const n = 200
	tokens := env.sessionTokens(n)
	// Serve env's server on a listener that says when the server has closed
	// each connection: the wait below is for that, not for time to pass.
	closed := make(chan struct{}, 3*n)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: env.srv}
	served := make(chan struct{})
	go func() { hs.Serve(&trackedListener{Listener: ln, closed: closed}); close(served) }()
	defer func() { hs.Close(); <-served }()
	addr := ln.Addr().String()

	sessions, goroutines, fds := env.srv.mcp.len(), runtime.NumGoroutine(), openFDs()
	for range 3 {
		conns := openStreams(t, addr, tokens)
		if got := env.srv.mcp.len(); got != sessions+n {
			t.Fatalf("%d MCP sessions with %d streams open, want %d", got, n, sessions+n)
		}
		for _, c := range conns {
			c.Close()
		}
		for range n {
			<-closed // the server has closed one of them
		}
	}
	if got := env.srv.mcp.len(); got != sessions {
		t.Errorf("%d MCP sessions after the streams closed, want %d", got, sessions)
	}
	if got := openFDs(); fds >= 0 && got > fds {
		t.Errorf("%d descriptors open after the streams closed, want at most %d", got, fds)
	}
	// The server's goroutines are returning from closing the connections;
	// under the race detector on a busy machine that can take a while. A
	// leak fails after ten seconds; a pass takes no longer than they take.
	for deadline := time.Now().Add(10 * time.Second); runtime.NumGoroutine() > goroutines && time.Now().Before(deadline); {
		runtime.Gosched()
	}
	if got := runtime.NumGoroutine(); got > goroutines {
		t.Errorf("%d goroutines after the streams closed, want at most %d", got, goroutines)
	}
}

// trackedListener sends on closed each time the server closes a connection.
type trackedListener struct {
	net.Listener
	closed chan<- struct{}
}

func (l *trackedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &trackedConn{Conn: c, closed: l.closed}, nil
}

type trackedConn struct {
	net.Conn
	once   sync.Once
	closed chan<- struct{}
}

func (c *trackedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.closed <- struct{}{} })
	return err
}

// openFDs counts this process's open descriptors, or returns -1 where /proc
// cannot tell.
func openFDs() int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(entries)
}

// TestStrictJSONKnowsTheNames checks that the member names checkMemberNames
// holds to are those the structs decode: a field added to one and not the
// other would let its case variants through.
func TestStrictJSONKnowsTheNames(t *testing.T) {
	tags := func(v any) []string {
		var names []string
		for f := range reflect.TypeOf(v).Fields() {
			if name, _, _ := strings.Cut(f.Tag.Get("json"), ","); name != "" && name != "-" {
				names = append(names, name)
			}
		}
		slices.Sort(names)
		return names
	}
	sorted := func(names []string) []string { return slices.Sorted(slices.Values(names)) }
	if got, want := sorted(clientMetadataNames), tags(clientMetadata{}); !slices.Equal(got, want) {
		t.Errorf("clientMetadataNames = %v, want the json names of clientMetadata, %v", got, want)
	}
	if got, want := sorted(rpcMemberNames[""]), tags(rpcMessage{}); !slices.Equal(got, want) {
		t.Errorf("rpcMemberNames[\"\"] = %v, want the json names of rpcMessage, %v", got, want)
	}
}

// ---- Fuzz targets and benchmarks ----

// Fuzzing. go test runs each target on its seeds; go test -fuzz=FuzzX -run
// '^$' explores further.

// FuzzSessionToken: the verifiers never panic, and never accept a token
// they did not mint.
func FuzzSessionToken(f *testing.F) {
	c := newSessionCodec("https://mcp.example", func() time.Time { return time.Unix(1e9, 0) }, make([]byte, 32))
	valid := c.mint(sessionClaims{Audience: "https://mcp.example", SessionID: "SID", Expiry: 2e9, TokenID: "T"})
	refresh := c.refreshToken("SID", 7)
	h, p, sig, _ := cut3(valid)
	for _, seed := range []string{valid, refresh, "", ".", "..", h + "." + p + "." + sig[:10], h + "." + p + ".", h + ".." + sig,
		"eyJhbGciOiJub25lIn0." + p + ".", valid + "=", "rt1.SID.7.", "rt1.SID.18446744073709551616." + sig} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, token string) {
		if claims, err := c.verify(token); err == nil && token != valid {
			t.Errorf("verify accepted %q, which it did not mint (%+v)", token, claims)
		}
		if sid, gen, ok := c.parseRefreshToken(token); ok && token != c.refreshToken(sid, gen) {
			t.Errorf("parseRefreshToken accepted %q, which it did not mint", token)
		}
	})
}

// FuzzJSONRPC: the decoder and the dispatcher never panic, and answer every
// request with a valid JSON-RPC response (and notifications with nothing).
func FuzzJSONRPC(f *testing.F) {
	env := newTestEnv(f)
	env.srv.log = slog.New(slog.DiscardHandler)
	env.entra.set(func() {
		env.entra.accessTokens["fuzz"] = fakeGrant{user: env.entra.user, scope: "User.Read", expires: env.clock.now().Add(24 * time.Hour)}
	})
	sess := &session{id: "fuzz", clientID: "c", resource: env.url,
		entraToken: &oauth2.Token{AccessToken: "fuzz", RefreshToken: "r"}, entraExpiry: env.clock.now().Add(24 * time.Hour)}
	for _, seed := range []string{
		`{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-03-26"}}`,
		`{"jsonrpc":"2.0","id":"a","method":"ping"}`, `{"jsonrpc":"2.0","method":"notifications/initialized"}`,
		`{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{"cursor":5}}`,
		`{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"getUserDetails","arguments":{}}}`,
		`[{"jsonrpc":"2.0","id":4,"method":"ping"},{"jsonrpc":"2.0","method":"x"},{"id":5}]`,
		`{"jsonrpc":"2.0","id":6,"result":{}}`, `{"jsonrpc":"2.0","id":null}`, `[]`, `null`, `"`, "[[[[", "{\"id\":\"\xff\"}",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		ms := &mcpSession{id: "m", owner: sess.id, protocolVersion: "2025-03-26"}
		b, errResp := decodeBody(body)
		if errResp != nil {
			checkResponse(t, errResp, nil)
			return
		}
		if errResp := b.checkBatch(ms); errResp != nil {
			checkResponse(t, errResp, nil)
			return
		}
		reply, err := env.srv.respond(t.Context(), ms, sess, b)
		if err != nil {
			t.Fatalf("run: %v", err)
		}
		requests := 0
		for _, m := range b.messages {
			if m.Method != "" && m.ID != nil {
				requests++
			}
		}
		switch r := reply.(type) {
		case nil:
			if requests+len(b.invalid) != 0 {
				t.Errorf("no answer to %s", body)
			}
		case *rpcResponse:
			checkResponse(t, r, b.messages[0].ID)
		case []*rpcResponse:
			if len(r) != requests+len(b.invalid) {
				t.Errorf("%d answers to %d requests in %s", len(r), requests+len(b.invalid), body)
			}
			for _, resp := range r {
				checkResponse(t, resp, resp.ID)
			}
		default:
			t.Errorf("answer of type %T", reply)
		}
	})
}

// checkResponse checks that r is a valid JSON-RPC 2.0 response with the id.
func checkResponse(t testing.TB, r *rpcResponse, id json.RawMessage) {
	t.Helper()
	out, err := json.Marshal(r)
	var back struct {
		JSONRPC string
		ID      json.RawMessage
		Result  json.RawMessage
		Error   *rpcError
	}
	if err != nil || json.Unmarshal(out, &back) != nil || back.JSONRPC != "2.0" || (back.Result == nil) == (back.Error == nil) {
		t.Fatalf("invalid response %s (%v)", out, err)
	}
	if (id != nil && string(back.ID) != string(id)) || (string(back.ID) != "null" && !validID(back.ID)) {
		t.Errorf("response %s has id %s, want %s", out, back.ID, id)
	}
}

// FuzzClientDocument: the checks of a client_id URL and of its metadata
// document never panic, and what they accept keeps the rules: a public https
// client of that exact id, with redirect URIs registration would take.
func FuzzClientDocument(f *testing.F) {
	id := "https://app.example.com/client.json"
	for _, seed := range []string{
		`{"client_id":"` + id + `","client_name":"App","redirect_uris":["http://127.0.0.1/callback"]}`,
		`{"client_id":"` + id + `","redirect_uris":["https://app.example.com/cb"],"token_endpoint_auth_method":"none","grant_types":["authorization_code"]}`,
		`{"client_id":"` + id + `","redirect_uris":["http://127.0.0.1/cb"],"client_secret":"x"}`,
		`{"client_id":"` + id + `","redirect_uris":["javascript:alert(1)"]}`, `{"client_id":"https://other.example/c"}`,
		`{"client_id":"` + id + `","client_id":"` + id + `","redirect_uris":["http://127.0.0.1/cb"]}`, `[]`, `null`, "\xff",
	} {
		f.Add(id, []byte(seed))
	}
	f.Add("https://app.example.com/a/../client.json", []byte(`{}`))
	f.Add("https://app.example.com/%2e/c#x", []byte(`{}`))
	f.Fuzz(func(t *testing.T, id string, body []byte) {
		if checkDocumentURL(id) != nil {
			return
		}
		if u, err := url.Parse(id); err != nil || u.Scheme != "https" || u.Host == "" || u.Fragment != "" || u.User != nil {
			t.Errorf("checkDocumentURL accepted %q", id)
		}
		c, err := parseClientDocument(id, body)
		if err != nil {
			return
		}
		if c.ID != id || c.TokenEndpointAuthMethod != "none" || c.secretHash != "" || len(c.RedirectURIs) == 0 ||
			!slices.Contains(c.GrantTypes, "authorization_code") || strings.TrimSpace(c.ClientName) == "" || len([]rune(c.ClientName)) > 81 || hasHiddenCharacters(c.ClientName) {
			t.Errorf("parseClientDocument accepted %s as %+v", body, c)
		}
		for _, u := range c.RedirectURIs {
			if err := checkRedirectURI(u); err != nil {
				t.Errorf("parseClientDocument accepted a redirect URI registration refuses: %v", err)
			}
		}
	})
}

// FuzzRegister: registration never panics; it registers only valid metadata
// and refuses the rest with an RFC 7591 error.
func FuzzRegister(f *testing.F) {
	env := newTestEnv(f)
	env.srv.log = slog.New(slog.DiscardHandler)
	for _, seed := range []string{
		`{"redirect_uris":["http://127.0.0.1:7777/callback"],"token_endpoint_auth_method":"none","client_name":"x"}`,
		`{"redirect_uris":["cursor://anysphere.cursor-mcp/oauth/callback","https://a.example/cb"],"grant_types":["authorization_code"]}`,
		`{"redirect_uris":["javascript:alert(1)"]}`, `{"redirect_uris":[]}`, `{"redirect_uris":"x"}`, `{"redirect_uris":[1]}`,
		`{"redirect_uris":["https://a.example/cb#f"],"response_types":["token"]}`, `[]`, `null`, `{}`, "\xff",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		rec := httptest.NewRecorder()
		env.srv.ServeHTTP(rec, httptest.NewRequest("POST", "/register", bytes.NewReader(body)))
		switch rec.Code {
		case http.StatusCreated:
			var reg registration
			if err := json.Unmarshal(rec.Body.Bytes(), &reg); err != nil {
				t.Fatalf("201 with %s: %v", rec.Body, err)
			}
			env.srv.clients.delete(reg.ClientID) // keep the store small
			for _, u := range reg.RedirectURIs {
				if err := checkRedirectURI(u); err != nil {
					t.Errorf("registered %q: %v", u, err)
				}
			}
			if !slices.Contains(authMethods, reg.TokenEndpointAuthMethod) || !slices.Contains(reg.GrantTypes, "authorization_code") ||
				(reg.ClientSecret == "") != (reg.TokenEndpointAuthMethod == "none") {
				t.Errorf("registered %+v", reg)
			}
		case http.StatusBadRequest, http.StatusRequestEntityTooLarge:
			var e struct{ Error string }
			json.Unmarshal(rec.Body.Bytes(), &e)
			if !slices.Contains([]string{"invalid_client_metadata", "invalid_redirect_uri", "invalid_request"}, e.Error) {
				t.Errorf("%d with %s", rec.Code, rec.Body)
			}
		default:
			t.Errorf("POST /register %q = %d %s", body, rec.Code, rec.Body)
		}
	})
}

// Performance. go test -run '^$' -bench . -benchmem runs the benchmarks.

func BenchmarkSessionToken(b *testing.B) {
	c := newSessionCodec("http://localhost:3001", func() time.Time { return time.Unix(1e9, 0) }, make([]byte, 32))
	claims := sessionClaims{Audience: "http://localhost:3001/mcp", Subject: "QmFzZTY0U3ViamVjdA", SessionID: newSecret(),
		ClientID: newSecret(), Scope: "mcp", IssuedAt: 1e9, Expiry: 1e9 + 3600}
	b.Run("mint", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			c.mint(claims)
		}
	})
	token := c.mint(claims)
	b.Run("verify", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := c.verify(token); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// benchRig is a signed-in server and the ceilings its round trips are
// compared with: bare net/http handlers on the same kind of loopback server
// that do only what any MCP server on net/http must do, check the bearer
// token (an HMAC and a JSON decode) and write a fixed JSON-RPC result; one
// of them also makes the same Graph call as getUserDetails.
type benchRig struct {
	env                   *testEnv
	client                *http.Client
	token                 string
	mcp                   http.Header // headers of a Streamable HTTP session
	ceiling, ceilingGraph string      // URLs
}

func newBenchRig(b *testing.B) *benchRig {
	env := newTestEnv(b)
	env.srv.log = slog.New(slog.DiscardHandler)
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConnsPerHost = 256
	r := &benchRig{env: env, client: &http.Client{Transport: transport}, token: env.signIn(b, signInOptions{}).AccessToken}
	c := &mcpClient{env: env, token: r.token}
	c.initialize(b, "2025-11-25")
	r.mcp = c.headers(nil)

	graphToken := env.entra.lastAccessToken()
	// The ceiling checks the token plainly, on its own: the MAC with a fresh
	// HMAC, then the claims decoded and the expiry checked. It does not call
	// the server's verifier, so that it measures what any server must pay,
	// whatever the server's verifier costs.
	macKey := deriveKey(env.cfg.sessionKeys[0], "session token v1")
	verify := func(token string) bool {
		i := strings.LastIndexByte(token, '.')
		if i < 0 {
			return false
		}
		mac := hmac.New(sha256.New, macKey)
		mac.Write([]byte(token[:i]))
		sig, err := base64.RawURLEncoding.DecodeString(token[i+1:])
		if err != nil || !hmac.Equal(sig, mac.Sum(nil)) {
			return false
		}
		_, payload, _ := strings.Cut(token[:i], ".")
		raw, err := base64.RawURLEncoding.DecodeString(payload)
		var claims sessionClaims
		return err == nil && json.Unmarshal(raw, &claims) == nil && env.clock.now().Unix() < claims.Expiry
	}
	bare := func(withGraph bool) string {
		ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			token, _ := strings.CutPrefix(req.Header.Get("Authorization"), "Bearer ")
			if !verify(token) {
				http.Error(w, "unauthorized", http.StatusUnauthorized)
				return
			}
			io.Copy(io.Discard, req.Body)
			if withGraph {
				if status, _, err := env.srv.graphGet(req.Context(), "/v1.0/me", graphToken); err != nil || status != http.StatusOK {
					http.Error(w, "graph", http.StatusBadGateway)
					return
				}
			}
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"jsonrpc":"2.0","id":1,"result":{}}`)
		}))
		b.Cleanup(ts.Close)
		return ts.URL
	}
	r.ceiling, r.ceilingGraph = bare(false), bare(true)
	return r
}

// post sends a POST and reads the whole answer.
func (r *benchRig) post(url string, h http.Header, body string) error {
	req, err := http.NewRequest("POST", url, strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header = h
	resp, err := r.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusAccepted {
		return fmt.Errorf("POST %s = %d", url, resp.StatusCode)
	}
	return nil
}

// roundTrip returns a function for one round trip of method over a
// transport ("ceiling", "ceiling+graph", "mcp" or "sse"); each caller gets
// its own, so that parallel callers over SSE each have their own stream.
func (r *benchRig) roundTrip(b *testing.B, transport, method string) func() error {
	params := map[string]string{"ping": `{}`, "tools/list": `{}`, "tools/call": `{"name":"getUserDetails"}`}[method]
	body := fmt.Sprintf(`{"jsonrpc":"2.0","id":1,"method":%q,"params":%s}`, method, params)
	switch transport {
	case "ceiling", "ceiling+graph":
		url := map[string]string{"ceiling": r.ceiling, "ceiling+graph": r.ceilingGraph}[transport]
		return func() error { return r.post(url, http.Header{"Authorization": {"Bearer " + r.token}}, body) }
	case "mcp":
		return func() error { return r.post(r.env.url+"/mcp", r.mcp, body) }
	case "modern": // MCP 2026-07-28: no session; its ping is server/discover
		method = cmp.Or(map[string]string{"ping": "server/discover"}[method], method)
		body = fmt.Sprintf(`{"jsonrpc":"2.0","id":1,"method":%q,"params":{"name":"getUserDetails","_meta":{%q:"2026-07-28",%q:{}}}}`,
			method, metaProtocolVersion, metaClientCapabilities)
		h := (&modernClient{token: r.token}).headers(method, nil)
		return func() error { return r.post(r.env.url+"/mcp", h, body) }
	}
	// HTTP+SSE: POST /message, then read the answer from the stream.
	req, _ := http.NewRequestWithContext(b.Context(), "GET", r.env.url+"/sse", nil)
	req.Header.Set("Authorization", "Bearer "+r.token)
	resp, err := r.client.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { resp.Body.Close() })
	events := &eventReader{r: bufio.NewReader(resp.Body)}
	endpoint, err := events.next()
	if err != nil {
		b.Fatal(err)
	}
	h := http.Header{"Authorization": {"Bearer " + r.token}, "Content-Type": {"application/json"}}
	return func() error {
		if err := r.post(r.env.url+endpoint.data, h, body); err != nil {
			return err
		}
		_, err := events.next()
		return err
	}
}

// BenchmarkCeiling is the floor any MCP server on net/http pays: a loopback
// POST whose handler checks the bearer token and writes a fixed result.
func BenchmarkCeiling(b *testing.B) {
	r := newBenchRig(b)
	for _, transport := range []string{"ceiling", "ceiling+graph"} {
		b.Run(transport, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				op := r.roundTrip(b, transport, "ping")
				for pb.Next() {
					if err := op(); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkRoundTrips measures authenticated MCP round trips over both
// transports, sequential and parallel, and reports each one's throughput as
// a multiple of the ceiling's measured in the same run (x-ceiling; tools/call
// against the ceiling that makes the same Graph call).
func BenchmarkRoundTrips(b *testing.B) {
	r := newBenchRig(b)
	for _, parallel := range []bool{false, true} {
		mode := map[bool]string{false: "sequential", true: "parallel"}[parallel]
		ceilings := map[string]float64{} // ns/op
		measure := func(name, transport, method string) {
			b.Run(mode+"/"+name, func(b *testing.B) {
				b.ReportAllocs()
				if parallel {
					b.RunParallel(func(pb *testing.PB) {
						op := r.roundTrip(b, transport, method)
						for pb.Next() {
							if err := op(); err != nil {
								b.Error(err)
								return
							}
						}
					})
				} else {
					op := r.roundTrip(b, transport, method)
					for b.Loop() {
						if err := op(); err != nil {
							b.Fatal(err)
						}
					}
				}
				nsPerOp := float64(b.Elapsed()) / float64(b.N)
				if strings.HasPrefix(transport, "ceiling") {
					ceilings[transport] = nsPerOp
				} else if c := ceilings[map[bool]string{false: "ceiling", true: "ceiling+graph"}[method == "tools/call"]]; c > 0 {
					b.ReportMetric(c/nsPerOp, "x-ceiling")
				}
			})
		}
		measure("ceiling", "ceiling", "ping")
		measure("ceiling+graph", "ceiling+graph", "ping")
		for _, transport := range []string{"mcp", "modern", "sse"} {
			for _, method := range []string{"ping", "tools/list", "tools/call"} {
				name := transport + "/" + method
				if transport == "modern" && method == "ping" {
					name = "modern/server/discover"
				}
				measure(name, transport, method)
			}
		}
	}
}

// sessionTokens makes n signed-in sessions directly on the server, as n
// sign-ins would, and returns their access tokens: one user may hold only a
// few MCP sessions, and n sign-ins through the browser would take long.
func (e *testEnv) sessionTokens(n int) []string {
	capAt(e.srv.sessions, e.srv.sessions.len()+n)
	capAt(e.srv.mcp, e.srv.mcp.len()+n)
	tokens := make([]string, n)
	for i := range tokens {
		sess := &session{id: newSecret(), subject: "bench-" + strconv.Itoa(i), clientID: "bench", scope: "mcp", resource: e.url,
			entraToken: &oauth2.Token{AccessToken: "x"}, entraExpiry: e.clock.now().Add(time.Hour)}
		e.srv.sessions.put(sess.id, sess, time.Hour)
		tokens[i] = e.srv.tokens.mint(sessionClaims{Audience: e.url, SessionID: sess.id, ClientID: "bench", Scope: "mcp",
			IssuedAt: e.clock.now().Unix(), Expiry: e.clock.now().Add(time.Hour).Unix()})
	}
	return tokens
}

// openStreams opens an event stream on the server at addr for each token,
// with raw TCP clients, so that what they cost the process is mostly the
// server's, and reads each one's first event.
func openStreams(b testing.TB, addr string, tokens []string) []net.Conn {
	conns := make([]net.Conn, 0, len(tokens))
	b.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for _, token := range tokens {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatalf("stream %d: %v", len(conns), err)
		}
		conns = append(conns, c)
		fmt.Fprintf(c, "GET /sse HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nAccept: text/event-stream\r\n\r\n", addr, token)
		br := bufio.NewReader(c)
		for data := false; ; {
			line, err := br.ReadString('\n')
			if err != nil {
				b.Fatalf("stream %d: %v", len(conns), err)
			}
			if strings.HasPrefix(line, "data:") {
				data = true
			} else if data && line == "\r\n" || data && line == "\n" {
				break
			}
		}
	}
	return conns
}

// measureOnce runs measure in the first iteration of b's loop only: a
// measurement of memory must not see the previous one still winding down.
func measureOnce(b *testing.B, measure func()) {
	done := false
	for b.Loop() {
		if !done {
			done = true
			measure()
		}
	}
}

// inUse is the memory in use: heap and goroutine stacks.
func inUse() (bytes uint64, goroutines int) {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse, runtime.NumGoroutine()
}

// BenchmarkIdleSessions measures what an idle session costs the server, over
// 1,000 of them: an open HTTP+SSE stream, beside the same measure for a
// streaming request held open by a bare handler (the ceiling: two
// goroutines per connection, as for an SSE stream); and an idle Streamable
// HTTP session, which holds no connection at all.
func BenchmarkIdleSessions(b *testing.B) {
	r := newBenchRig(b)
	const n = 1000
	// The ceiling: a bare handler that checks the token, sends one event
	// and holds the request open.
	ceiling := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		token, _ := strings.CutPrefix(req.Header.Get("Authorization"), "Bearer ")
		if _, err := r.env.srv.tokens.verify(token); err != nil {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "event: endpoint\ndata: /message\n\n")
		http.NewResponseController(w).Flush()
		<-req.Context().Done()
	}))
	b.Cleanup(ceiling.Close)

	tokens := r.env.sessionTokens(n)

	b.Run("streamable-session", func(b *testing.B) {
		measureOnce(b, func() {
			before, _ := inUse()
			body := `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}`
			sessions := make([]string, 0, n)
			for _, token := range tokens {
				req, _ := http.NewRequest("POST", r.env.url+"/mcp", strings.NewReader(body))
				req.Header = (&mcpClient{token: token}).headers(nil)
				resp, err := r.client.Do(req)
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				sessions = append(sessions, resp.Header.Get("Mcp-Session-Id"))
			}
			after, _ := inUse()
			b.ReportMetric(float64(int64(after)-int64(before))/n, "bytes/session")
			for _, id := range sessions {
				r.env.srv.mcp.delete(id)
			}
		})
	})

	// Both sets of streams are held open together, measured one after the
	// other, so that neither is measured while the other winds down.
	b.Run("sse-stream", func(b *testing.B) {
		measureOnce(b, func() {
			m0, g0 := inUse()
			openStreams(b, strings.TrimPrefix(ceiling.URL, "http://"), tokens)
			m1, g1 := inUse()
			openStreams(b, strings.TrimPrefix(r.env.url, "http://"), tokens)
			m2, g2 := inUse()
			ceilingBytes, ours := float64(m1-m0)/n, float64(m2-m1)/n
			b.ReportMetric(ceilingBytes, "ceiling-bytes/stream")
			b.ReportMetric(ours, "bytes/stream")
			b.ReportMetric(ours/ceilingBytes, "x-ceiling")
			b.ReportMetric(float64(g1-g0)/n, "ceiling-goroutines/stream")
			b.ReportMetric(float64(g2-g1)/n, "goroutines/stream")
		})
	})

}

// BenchmarkSignIn runs the whole sign-in, register → authorize → consent →
// Entra → callback → token, and reports the share of its time spent in the
// fake Entra ID and in this server's own code (its handlers, less the time
// the callback waits for Entra's token endpoint): ours should not dominate.
func BenchmarkSignIn(b *testing.B) {
	env := newTestEnv(b)
	env.srv.log = slog.New(slog.DiscardHandler)
	entra0, token0, ours0 := env.entra.busy.Load(), env.entra.busyToken.Load(), env.busy.Load()
	for b.Loop() {
		env.signIn(b, signInOptions{})
	}
	total := float64(b.Elapsed())
	inEntra, waitingForEntra := env.entra.busy.Load()-entra0, env.entra.busyToken.Load()-token0
	b.ReportMetric(100*float64(inEntra)/total, "%-in-Entra")
	b.ReportMetric(100*float64(env.busy.Load()-ours0-waitingForEntra)/total, "%-in-server")
}

// BenchmarkManyStreams holds 10,000 idle HTTP+SSE streams on one server and
// reports what each costs it. The clients run in a second process (this test
// binary again, as TestStreamClients), so that each process needs only one
// descriptor a stream and the memory measured is the server's alone.
func BenchmarkManyStreams(b *testing.B) {
	env := newTestEnv(b)
	env.srv.log = slog.New(slog.DiscardHandler)
	const n = 10_000
	tokens := filepath.Join(b.TempDir(), "tokens")
	if err := os.WriteFile(tokens, []byte(strings.Join(env.sessionTokens(n), "\n")), 0o600); err != nil {
		b.Fatal(err)
	}
	measureOnce(b, func() {
		m0, g0 := inUse()
		cmd := exec.CommandContext(b.Context(), os.Args[0], "-test.run=^TestStreamClients$", "-test.v")
		cmd.Env = append(os.Environ(), "ENTRA_MCP_STREAM_CLIENTS="+strings.TrimPrefix(env.url, "http://")+" "+tokens)
		hold, _ := cmd.StdinPipe()
		out, _ := cmd.StdoutPipe()
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		if !waitForLine(out, "streams open") {
			b.Fatal("the client process did not open its streams")
		}
		m1, g1 := inUse()
		b.ReportMetric(float64(m1-m0)/n, "bytes/stream")
		b.ReportMetric(float64(g1-g0)/n, "goroutines/stream")
		b.ReportMetric(float64(m1-m0)/(1<<20), "MiB")
		hold.Close() // the client process closes its streams and exits
		cmd.Wait()
	})
}

// TestStreamClients is the client process of BenchmarkManyStreams, and skips
// otherwise: it opens a stream for each token and holds them until its
// standard input closes.
func TestStreamClients(t *testing.T) {
	addr, tokens, ok := strings.Cut(os.Getenv("ENTRA_MCP_STREAM_CLIENTS"), " ")
	if !ok {
		t.Skip("the client process of BenchmarkManyStreams")
	}
	data, err := os.ReadFile(tokens)
	if err != nil {
		t.Fatal(err)
	}
	openStreams(t, addr, strings.Split(string(data), "\n"))
	fmt.Println("streams open")
	io.Copy(io.Discard, os.Stdin)
}

// waitForLine reads r until a line holds want.
func waitForLine(r io.Reader, want string) bool {
	lines := bufio.NewScanner(r)
	for lines.Scan() {
		if strings.Contains(lines.Text(), want) {
			go io.Copy(io.Discard, r)
			return true
		}
	}
	return false
}

// BenchmarkStateFile measures the state files with 10,000 registrations and
// 1,000 signed-in sessions (Entra tokens of a realistic size): what a save of
// the sessions costs, which a token request that changes one waits for, and
// what the background save of the registrations costs, which nobody waits for;
// and the size of each file.
func BenchmarkStateFile(b *testing.B) {
	env := newTestEnv(b, func(c *config) { c.stateFile = filepath.Join(b.TempDir(), "state") })
	env.srv.log = slog.New(slog.DiscardHandler)
	md := clientMetadata{RedirectURIs: []string{"http://127.0.0.1:33418/", "https://vscode.dev/redirect"}, TokenEndpointAuthMethod: "none",
		GrantTypes: []string{"authorization_code", "refresh_token"}, ResponseTypes: []string{"code"}, ClientName: "Visual Studio Code", Scope: "mcp"}
	for range maxClients {
		id := newSecret()
		env.srv.clients.put(id, &client{clientMetadata: md, ID: id, IssuedAt: 1}, clientTTL)
	}
	for i := range 1_000 {
		sess := &session{id: newSecret(), subject: "bench-" + strconv.Itoa(i), clientID: "bench", scope: "mcp", resource: env.url,
			entraToken:  &oauth2.Token{AccessToken: strings.Repeat("a", 2000), RefreshToken: strings.Repeat("r", 1500)},
			entraExpiry: env.clock.now().Add(time.Hour)}
		env.srv.sessions.put(sess.id, sess, time.Hour)
	}
	size := func(path string) float64 {
		info, err := os.Stat(path)
		if err != nil {
			b.Fatal(err)
		}
		return float64(info.Size()) / (1 << 20)
	}
	b.Run("sessions", func(b *testing.B) {
		for b.Loop() {
			env.srv.saveState()
		}
		b.ReportMetric(size(env.cfg.stateFile), "file-MiB")
	})
	b.Run("registrations", func(b *testing.B) {
		for b.Loop() {
			env.srv.registrationsChanged()
			env.srv.saveClients()
		}
		b.ReportMetric(size(clientsFile(env.cfg.stateFile)), "file-MiB")
	})
}

// BenchmarkAbandonedAuthorizations sends authorization requests that are
// never completed, as a loop or an attacker would, and reports what the
// server keeps: at most maxPending consents, however many arrive. Run it with
// -benchtime=100000x for 100k of them.
func BenchmarkAbandonedAuthorizations(b *testing.B) {
	env := newTestEnv(b)
	rec := httptest.NewRecorder()
	env.srv.ServeHTTP(rec, httptest.NewRequest("POST", "/register", strings.NewReader(`{"redirect_uris":["http://127.0.0.1/cb"],"token_endpoint_auth_method":"none"}`)))
	var reg registration
	json.Unmarshal(rec.Body.Bytes(), &reg)
	c := &testClient{id: reg.ClientID, redirectURI: "http://127.0.0.1/cb", verifier: oauth2.GenerateVerifier()}
	path := c.authorizeURL(nil)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	i := 0
	for b.Loop() { // from ever new addresses, as a botnet would
		r := httptest.NewRequest("GET", path, nil)
		r.RemoteAddr = fmt.Sprintf("10.%d.%d.%d:1234", i>>16&255, i>>8&255, i&255)
		env.srv.ServeHTTP(httptest.NewRecorder(), r)
		i++
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if n := env.srv.consents.len(); n > maxPending {
		b.Fatalf("%d consents kept, past the cap %d", n, maxPending)
	}
	b.ReportMetric(float64(env.srv.consents.len()), "consents-kept")
	b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/(1<<20), "heap-MiB")
}

// ---- The demo, the test environment and the fake Entra ID ----

// TestDemo serves the real server against the fake Entra ID until
// interrupted. Run it with: go test -run TestDemo -demo -timeout 0
// Every setting comes from the environment, as for go run ., except the
// ENTRA_* settings, GRAPH_URL and ALLOWED_TENANTS, which belong to the fake.
func TestDemo(t *testing.T) {
	if !*demo {
		t.Skip("run with -demo to try the server without an Entra tenant")
	}
	if *demoEntraTTL < time.Second {
		t.Fatalf("-demo-entra-ttl %v: want at least 1s", *demoEntraTTL)
	}
	f, getenv := newDemo(t, os.Getenv, time.Now, *demoEntraTTL)
	publicURL := demoPublicURL(os.Getenv)
	fmt.Printf(`
entra-mcp demo: the real server on %[1]s, with a fake Entra ID at %[2]s (its tokens live %[5]s).
Give your MCP client this URL:  %[1]s/mcp  (older, SSE-only clients: %[1]s/sse)
For example: npx @modelcontextprotocol/inspector, then add the server (Streamable HTTP) and connect.
You will sign in as the demo user %[3]s (%[4]s). Press Ctrl-C to stop.

`, publicURL, f.URL, f.user.name, f.user.upn, *demoEntraTTL)
	if err := run(t.Context(), []string{"entra-mcp"}, getenv, os.Stdout, os.Stderr); err != nil {
		t.Fatal(err)
	}
}

// newDemo starts the demo's fake Entra ID, its redirect URI following
// PUBLIC_URL and its access tokens living entraTTL, and returns it with the
// demo's environment: getenv's, except that every ENTRA_* setting, GRAPH_URL
// and ALLOWED_TENANTS (a real tenant's would refuse the fake's user) belong
// to the fake.
func newDemo(t testing.TB, getenv func(string) string, now func() time.Time, entraTTL time.Duration) (*fakeEntra, func(string) string) {
	f := newFakeEntra(t, fakeEntraOptions{redirectURI: demoPublicURL(getenv) + "/auth/callback", interactive: true, now: now})
	f.set(func() { f.expiresIn = int(entraTTL.Seconds()) })
	fake := map[string]string{
		"ENTRA_TENANT_ID": f.tenantID, "ENTRA_CLIENT_ID": f.clientID, "ENTRA_CLIENT_SECRET": f.clientSecret,
		"ENTRA_AUTHORITY": f.URL, "GRAPH_URL": f.URL,
	}
	// Instead of the fake's secret, a certificate of yours, which the fake
	// then holds; or a token file, which the demo keeps writing, as a
	// platform would, with tokens of an issuer the fake trusts.
	if path := strings.TrimSpace(getenv("ENTRA_CLIENT_CERTIFICATE")); path != "" {
		c, err := loadCertificate(path, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		f.set(func() { f.certificate = c.cert })
		fake["ENTRA_CLIENT_SECRET"], fake["ENTRA_CLIENT_CERTIFICATE"] = "", path
	} else if path := strings.TrimSpace(getenv("ENTRA_CLIENT_ASSERTION_FILE")); path != "" {
		issuer := &fakeIssuer{key: testKeys()[1], url: f.URL + "/demo-issuer", subject: "entra-mcp-demo", path: path}
		f.set(func() {
			f.federation = &fakeFederation{issuer: issuer.url, subject: issuer.subject, key: &issuer.key.PublicKey}
		})
		issuer.write(t, now().Add(time.Hour))
		go func() { // a new token every 10 minutes, each valid for an hour
			tick := time.NewTicker(10 * time.Minute)
			defer tick.Stop()
			for {
				select {
				case <-tick.C:
					if _, err := issuer.rotate(now().Add(time.Hour)); err != nil {
						t.Log("demo: the federated token could not be written:", err)
					}
				case <-t.Context().Done():
					return
				}
			}
		}()
		fake["ENTRA_CLIENT_SECRET"], fake["ENTRA_CLIENT_ASSERTION_FILE"] = "", path
	}
	return f, func(k string) string {
		if strings.HasPrefix(k, "ENTRA_") || k == "GRAPH_URL" || k == "ALLOWED_TENANTS" {
			return fake[k]
		}
		return getenv(k)
	}
}

// demoPublicURL is the demo server's PUBLIC_URL, as run reads it.
func demoPublicURL(getenv func(string) string) string {
	u, err := originURL("PUBLIC_URL", cmp.Or(strings.TrimSpace(getenv("PUBLIC_URL")), "http://localhost:3001"))
	if err != nil {
		return "http://localhost:3001" // run refuses it, and says why
	}
	return u
}

// TestDemoEnvironment checks the demo's settings: the environment's, but
// for Entra ID and Graph, which are the fake's.
func TestDemoEnvironment(t *testing.T) {
	outer := map[string]string{
		"ADDR": "127.0.0.1:4000", "PUBLIC_URL": "http://127.0.0.1:4000/", "STATE_FILE": "/tmp/demo-state",
		"SESSION_KEY": strings.Repeat("ab", 32), "ACCESS_TOKEN_TTL": "30s", "RATE_LIMIT": "0", "ALLOWED_ORIGINS": "https://app.example",
		"ENTRA_TENANT_ID": "real-tenant", "ENTRA_CLIENT_ID": "real-client", "ENTRA_CLIENT_SECRET": "real-secret",
		"ENTRA_AUTHORITY": "https://login.microsoftonline.com", "GRAPH_URL": "https://graph.microsoft.com", "ENTRA_SOMETHING_NEW": "x",
		"ALLOWED_TENANTS": "72f988bf-86f1-41af-91ab-2d7cd011db47", "CLIENT_METADATA_ALLOW_LOOPBACK": "1", "CLIENT_METADATA_DOCUMENTS": "on",
	}
	f, getenv := newDemo(t, func(k string) string { return outer[k] }, time.Now, 2*time.Minute)
	if f.expiresIn != 120 {
		t.Errorf("the fake's tokens live %ds, want the demo's -demo-entra-ttl, 120s", f.expiresIn)
	}
	for k, v := range outer {
		want := v
		switch {
		case k == "ENTRA_TENANT_ID":
			want = f.tenantID
		case k == "ENTRA_CLIENT_ID":
			want = f.clientID
		case k == "ENTRA_CLIENT_SECRET":
			want = f.clientSecret
		case k == "ENTRA_AUTHORITY" || k == "GRAPH_URL":
			want = f.URL
		case strings.HasPrefix(k, "ENTRA_") || k == "ALLOWED_TENANTS":
			want = ""
		}
		if got := getenv(k); got != want {
			t.Errorf("demo %s = %q, want %q", k, got, want)
		}
	}
	if want := "http://127.0.0.1:4000/auth/callback"; f.redirectURI != want {
		t.Errorf("the fake's redirect URI = %q, want %q: it follows PUBLIC_URL", f.redirectURI, want)
	}
	if _, getenv := newDemo(t, func(string) string { return "" }, time.Now, time.Hour); getenv("PUBLIC_URL") != "" || demoPublicURL(getenv) != "http://localhost:3001" {
		t.Errorf("demo without PUBLIC_URL serves at %q, want the default", demoPublicURL(getenv))
	}

	t.Run("a certificate or a token file instead of the fake's secret", func(t *testing.T) {
		cert, file := newTestCertificate(t, testKeys()[0], time.Now().Add(time.Hour))
		certPath, tokenPath := filepath.Join(t.TempDir(), "cert.pem"), filepath.Join(t.TempDir(), "token")
		os.WriteFile(certPath, file, 0o600)
		f, getenv := newDemo(t, envOf(map[string]string{"ENTRA_CLIENT_CERTIFICATE": certPath}), time.Now, time.Hour)
		if getenv("ENTRA_CLIENT_SECRET") != "" || getenv("ENTRA_CLIENT_CERTIFICATE") != certPath || f.certificate == nil || !f.certificate.Equal(cert) {
			t.Errorf("demo with a certificate: secret %q, certificate %q, the fake holds %v", getenv("ENTRA_CLIENT_SECRET"), getenv("ENTRA_CLIENT_CERTIFICATE"), f.certificate != nil)
		}
		f, getenv = newDemo(t, envOf(map[string]string{"ENTRA_CLIENT_ASSERTION_FILE": tokenPath}), time.Now, time.Hour)
		token, err := readAssertionFile(tokenPath)
		if err != nil || getenv("ENTRA_CLIENT_SECRET") != "" || getenv("ENTRA_CLIENT_ASSERTION_FILE") != tokenPath {
			t.Fatalf("demo with a token file: %v, secret %q", err, getenv("ENTRA_CLIENT_SECRET"))
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		if got, _ := f.checkAssertion("urn:ietf:params:oauth:client-assertion-type:jwt-bearer", token, ""); got != 0 {
			t.Errorf("the demo's fake refuses the demo's token: AADSTS%d", got)
		}
	})
}

// envOf returns a getenv that reads settings from m.
func envOf(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

// The test environment.

// testEnv is one server under test, on loopback, with its own fake Entra ID
// and clock.
type testEnv struct {
	url   string
	srv   *server
	entra *fakeEntra
	clock *testClock
	logs  *lockedBuffer

	// For restart: what built srv, and the server the listener serves.
	cfg     config
	logger  *slog.Logger
	ec      *entraClient
	serving atomic.Pointer[server]
	busy    atomic.Int64    // time spent handling requests, in ns
	docs    *documentServer // where client metadata documents are published, if anywhere
}

// testKeys are RSA keys for the tests' certificates and federated issuers,
// made once per test binary: generating them is slow under -race.
var testKeys = sync.OnceValue(func() []*rsa.PrivateKey {
	keys := make([]*rsa.PrivateKey, 2)
	for i := range keys {
		keys[i], _ = rsa.GenerateKey(rand.Reader, 2048)
	}
	return keys
})

// newTestCertificate returns a self-signed certificate of key that expires
// at notAfter, and the PEM file of it and its key (PKCS#8).
func newTestCertificate(t testing.TB, key *rsa.PrivateKey, notAfter time.Time) (*x509.Certificate, []byte) {
	t.Helper()
	template := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "entra-mcp test"},
		NotBefore: notAfter.Add(-2 * 365 * 24 * time.Hour), NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	return cert, append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})...)
}

// newCertificateEnv is a test environment whose server has no client secret
// but a certificate, which the app registration holds.
func newCertificateEnv(t testing.TB) (*testEnv, *clientCertificate) {
	t.Helper()
	cert, file := newTestCertificate(t, testKeys()[0], time.Now().Add(365*24*time.Hour))
	path := filepath.Join(t.TempDir(), "cert.pem")
	os.WriteFile(path, file, 0o600)
	c, err := loadCertificate(path, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	env := newTestEnv(t, func(cfg *config) { cfg.clientSecret, cfg.certificate = "", c })
	env.entra.set(func() { env.entra.certificate = cert })
	return env, c
}

// fakeIssuer is another identity provider, which issues this workload
// tokens the app registration trusts, and a platform that writes them to
// the file ENTRA_CLIENT_ASSERTION_FILE names.
type fakeIssuer struct {
	key          *rsa.PrivateKey
	url, subject string
	path         string
}

// write writes a new token, valid until expires, to the file, and returns it.
func (i *fakeIssuer) write(t testing.TB, expires time.Time) string {
	t.Helper()
	token, err := i.rotate(expires)
	if err != nil {
		t.Fatal(err)
	}
	return token
}

// rotate replaces the file with a new token, valid until expires, at once:
// a reader never sees half of one.
func (i *fakeIssuer) rotate(expires time.Time) (string, error) {
	h, _ := json.Marshal(map[string]any{"alg": "RS256", "typ": "JWT"})
	c, _ := json.Marshal(map[string]any{"iss": i.url, "sub": i.subject, "aud": "api://AzureADTokenExchange", "jti": rand.Text(), "exp": expires.Unix()})
	signed := base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(c)
	digest := sha256.Sum256([]byte(signed))
	sig, err := rsa.SignPKCS1v15(rand.Reader, i.key, crypto.SHA256, digest[:])
	if err != nil {
		return "", err
	}
	token := signed + "." + base64.RawURLEncoding.EncodeToString(sig)
	if err := os.WriteFile(i.path+".new", []byte(token+"\n"), 0o600); err != nil {
		return "", err
	}
	return token, os.Rename(i.path+".new", i.path)
}

// newFederatedEnv is a test environment whose server has no client secret
// but a file of federated tokens, whose issuer the app registration trusts.
func newFederatedEnv(t testing.TB) (*testEnv, *fakeIssuer) {
	t.Helper()
	issuer := &fakeIssuer{key: testKeys()[1], url: "https://issuer.example", subject: "system:serviceaccount:mcp:entra-mcp",
		path: filepath.Join(t.TempDir(), "token")}
	issuer.write(t, time.Now().Add(time.Hour))
	env := newTestEnv(t, func(cfg *config) { cfg.clientSecret, cfg.assertionFile = "", issuer.path })
	env.entra.set(func() {
		env.entra.federation = &fakeFederation{issuer: issuer.url, subject: issuer.subject, key: &issuer.key.PublicKey}
	})
	issuer.write(t, env.clock.now().Add(time.Hour)) // valid on the tests' clock
	return env, issuer
}

// signJWT returns a JWT of header and claims, signed with key by the header's
// alg (PS256 or RS256; anything else gets an RS256 signature).
func signJWT(t testing.TB, key *rsa.PrivateKey, header, claims map[string]any) string {
	t.Helper()
	h, _ := json.Marshal(header)
	c, _ := json.Marshal(claims)
	signed := base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(c)
	digest := sha256.Sum256([]byte(signed))
	var sig []byte
	var err error
	if header["alg"] == "PS256" {
		sig, err = rsa.SignPSS(rand.Reader, key, crypto.SHA256, digest[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
	} else {
		sig, err = rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, digest[:])
	}
	if err != nil {
		t.Fatal(err)
	}
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// signPSSMaxSalt signs jwt's header and claims again with PSS and the
// longest salt the key allows, which is not what PS256 means.
func signPSSMaxSalt(t testing.TB, key *rsa.PrivateKey, jwt string) string {
	t.Helper()
	signed := jwt[:strings.LastIndex(jwt, ".")]
	digest := sha256.Sum256([]byte(signed))
	sig, err := rsa.SignPSS(rand.Reader, key, crypto.SHA256, digest[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
	if err != nil {
		t.Fatal(err)
	}
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// jwtParts decodes a JWT's header and claims.
func jwtParts(t testing.TB, jwt string) (header, claims map[string]any) {
	t.Helper()
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 || decodeSegment(parts[0], &header) != nil || decodeSegment(parts[1], &claims) != nil {
		t.Fatalf("not a JWT: %q", jwt)
	}
	return header, claims
}

// newTestEnv starts a server; opts may change its configuration.
func newTestEnv(t testing.TB, opts ...func(*config)) *testEnv {
	t.Helper()
	clock := &testClock{t: time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)}
	ts := httptest.NewUnstartedServer(nil)
	publicURL := "http://" + ts.Listener.Addr().String()
	entra := newFakeEntra(t, fakeEntraOptions{redirectURI: publicURL + "/auth/callback", now: clock.now})

	cfg := config{
		tenantID: entra.tenantID, clientID: entra.clientID, clientSecret: entra.clientSecret,
		authority: entra.URL, graphURL: entra.URL, publicURL: publicURL,
		sessionKeys: [][]byte{randomBytes(32)}, accessTTL: time.Hour, refreshTTL: 14 * 24 * time.Hour,
		documents: true,
	}
	for _, opt := range opts {
		opt(&cfg)
	}
	logs := &lockedBuffer{}
	logger := slog.New(slog.NewTextHandler(io.MultiWriter(t.Output(), logs), nil))
	// The client to Entra and Graph has no timeout here, unlike the server's:
	// a debugger paused on a breakpoint must not make the next call fail.
	httpClient := newHTTPClient()
	httpClient.Timeout = 0
	ec, err := discoverEntra(t.Context(), cfg, httpClient, clock.now)
	if err != nil {
		t.Fatal(err)
	}
	env := &testEnv{url: publicURL, entra: entra, clock: clock, logs: logs, cfg: cfg, logger: logger, ec: ec}
	ts.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		env.serving.Load().ServeHTTP(w, r)
		env.busy.Add(int64(time.Since(start)))
	})
	t.Cleanup(ts.Close)
	if err := env.start(t); err != nil {
		t.Fatal(err)
	}
	ts.Start()
	return env
}

// start builds a server from the environment's configuration, loads its state
// file, if any, and serves it in place of the one before, which is dropped
// as it stands: the restart of a process killed with -9.
func (e *testEnv) start(t testing.TB) error {
	if e.srv != nil {
		// run's background saver writes registrations within seconds of a
		// change; the process is killed later than that.
		e.srv.saveClients()
	}
	srv := newServer(e.cfg, e.logger, e.ec, e.clock.now)
	// No wall-clock limit that a debugger paused on a breakpoint could trip:
	// a stream unread for 30 seconds would be closed. The tests of that limit
	// set their own.
	srv.streamStall = time.Hour
	if e.docs != nil {
		srv.documents = e.docs.cache(e.clock.now)
	}
	if err := srv.loadState(); err != nil {
		return err
	}
	t.Cleanup(srv.closeStreams) // before the listener closes, which waits for open streams
	e.srv = srv
	e.serving.Store(srv)
	return nil
}

// do sends a request to the server and returns the response; its body is
// closed at the end of the test.
func (e *testEnv) do(t testing.TB, method, path string, body io.Reader, h http.Header) *http.Response {
	t.Helper()
	resp := e.send(t, t.Context(), method, path, body, h)
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// send sends a request in ctx; the caller closes the body.
func (e *testEnv) send(t testing.TB, ctx context.Context, method, path string, body io.Reader, h http.Header) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, e.url+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range h {
		req.Header[k] = v
	}
	if method == "POST" && req.Header.Get("Content-Type") == "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func (e *testEnv) postForm(t testing.TB, path string, form url.Values, h http.Header) *http.Response {
	t.Helper()
	if h == nil {
		h = http.Header{}
	}
	h.Set("Content-Type", "application/x-www-form-urlencoded")
	return e.do(t, "POST", path, strings.NewReader(form.Encode()), h)
}

func (e *testEnv) getJSON(t testing.TB, path string, v any) {
	t.Helper()
	decodeJSON(t, e.do(t, "GET", path, nil, nil), http.StatusOK, v)
}

// register registers a client and returns the registration response.
func (e *testEnv) register(t testing.TB, body string) map[string]any {
	t.Helper()
	var reg map[string]any
	decodeJSON(t, e.do(t, "POST", "/register", strings.NewReader(body), nil), http.StatusCreated, &reg)
	for k, v := range reg {
		if v == nil {
			t.Errorf("registration response has %s: null", k)
		}
	}
	return reg
}

// testClient is a registered MCP client with its PKCE verifier, and the
// resource it asks tokens for (RFC 8707), if any.
type testClient struct {
	id, secret, redirectURI, verifier string
	resource                          string
}

// newClient registers a client with the loopback redirect URI and the given
// extra metadata fields.
func (e *testEnv) newClient(t testing.TB, fields string) *testClient {
	t.Helper()
	c := &testClient{redirectURI: "http://127.0.0.1:7777/callback", verifier: oauth2.GenerateVerifier()}
	reg := e.register(t, `{"redirect_uris":["`+c.redirectURI+`"],`+fields+`}`)
	c.id = reg["client_id"].(string)
	c.secret, _ = reg["client_secret"].(string)
	return c
}

// documentServer is an application's web site, publishing client metadata
// documents over TLS. It listens on loopback, as everything in the tests does,
// under any name in example.com: the server under test fetches from it with
// its own document cache, which trusts the site's certificate, may fetch from
// loopback (as with CLIENT_METADATA_ALLOW_LOOPBACK=1) and reaches the names
// in example.com at the site's loopback address.
type documentServer struct {
	*httptest.Server
	fetches atomic.Int32
	mu      sync.Mutex
	answers map[string]documentAnswer // by path
}

type documentAnswer struct {
	status int
	header http.Header
	body   string
}

// publishDocuments starts e's document site, and has e's server fetch from it.
func (e *testEnv) publishDocuments(t testing.TB) *documentServer {
	t.Helper()
	d := &documentServer{answers: map[string]documentAnswer{}}
	d.Server = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d.fetches.Add(1)
		d.mu.Lock()
		a, ok := d.answers[r.URL.Path]
		d.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		maps.Copy(w.Header(), a.header)
		w.WriteHeader(a.status)
		io.WriteString(w, a.body)
	}))
	t.Cleanup(d.Close)
	e.docs = d
	e.srv.documents = d.cache(e.clock.now)
	return d
}

// cache returns a document cache for the server under test that fetches from d.
func (d *documentServer) cache(now func() time.Time) *documentCache {
	roots := x509.NewCertPool()
	roots.AddCert(d.Certificate())
	c := newDocumentCache(true, roots, now)
	transport := c.httpClient.Transport.(*http.Transport)
	dial := transport.DialContext
	_, port, _ := net.SplitHostPort(d.Listener.Addr().String())
	transport.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if host, p, _ := net.SplitHostPort(addr); strings.HasSuffix(host, ".example.com") && p == port {
			addr = d.Listener.Addr().String() // the address check still sees it
		}
		return dial(ctx, network, addr)
	}
	return c
}

// url returns the URL of path on d, under the name app.example.com.
func (d *documentServer) url(path string) string {
	_, port, _ := net.SplitHostPort(d.Listener.Addr().String())
	return "https://app.example.com:" + port + path
}

// answer has d answer requests for path so.
func (d *documentServer) answer(path string, status int, header http.Header, body string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.answers[path] = documentAnswer{status, header, body}
}

// publish publishes at path a document of fields (JSON members, without the
// braces) and its own client_id, and returns a client that identifies by it,
// with the loopback redirect URI of newClient.
func (d *documentServer) publish(path, fields string) *testClient {
	c := &testClient{id: d.url(path), redirectURI: "http://127.0.0.1:7777/callback", verifier: oauth2.GenerateVerifier()}
	d.answer(path, http.StatusOK, http.Header{"Content-Type": {"application/json"}},
		`{"client_id":"`+c.id+`","client_name":"Document client","redirect_uris":["http://127.0.0.1/callback"]`+strings.TrimSuffix(","+fields, ",")+`}`)
	return c
}

// authorizeURL is the path of a valid authorization request by c.
func (c *testClient) authorizeURL(extra url.Values) string {
	q := url.Values{"response_type": {"code"}, "client_id": {c.id}, "redirect_uri": {c.redirectURI}, "state": {"client-state"},
		"code_challenge": {oauth2.S256ChallengeFromVerifier(c.verifier)}, "code_challenge_method": {"S256"}}
	if c.resource != "" {
		q.Set("resource", c.resource)
	}
	for k, v := range extra {
		q[k] = v
	}
	return "/authorize?" + q.Encode()
}

// toCallback takes browser b through consent and Entra's sign-in and returns
// the callback URL Entra redirected it to, not yet followed.
func (e *testEnv) toCallback(t testing.TB, b *browser, c *testClient) string {
	t.Helper()
	id := consentIDFrom(t, readBody(t, b.get(t, e.url+c.authorizeURL(nil))))
	entraURL := location(t, b.postForm(t, e.url+"/authorize", url.Values{"consent_id": {id}, "decision": {"approve"}}), http.StatusSeeOther)
	return location(t, b.get(t, entraURL.String()), http.StatusFound).String()
}

// codeFor signs in through c and returns our authorization code.
func (e *testEnv) codeFor(t testing.TB, c *testClient) string {
	t.Helper()
	b := newBrowser(t)
	u := location(t, b.get(t, e.toCallback(t, b, c)), http.StatusFound)
	if u.Query().Get("code") == "" {
		t.Fatalf("callback redirected to %s, want a code", u)
	}
	return u.Query().Get("code")
}

// redeem redeems a code for c's tokens.
func (e *testEnv) redeem(t testing.TB, c *testClient, code string) tokenResponse {
	t.Helper()
	var tokens tokenResponse
	form := url.Values{"grant_type": {"authorization_code"}, "code": {code},
		"redirect_uri": {c.redirectURI}, "client_id": {c.id}, "code_verifier": {c.verifier}}
	if c.secret != "" {
		form.Set("client_secret", c.secret)
	}
	resp := e.postForm(t, "/token", form, nil)
	decodeJSON(t, resp, http.StatusOK, &tokens)
	return tokens
}

// refresh redeems a public client's refresh token at /token.
func (e *testEnv) refresh(t testing.TB, token, clientID string) *http.Response {
	t.Helper()
	return e.postForm(t, "/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {token}, "client_id": {clientID}}, nil)
}

// signInOptions changes how signIn signs in.
type signInOptions struct {
	resource string // the resource to ask for; none by default
}

// signedIn is a signed-in public client's tokens.
type signedIn struct {
	tokenResponse
	clientID string
}

// signInAnotherUser signs in, through a new public client, a user other
// than the fake Entra ID's usual one.
func (e *testEnv) signInAnotherUser(t testing.TB) signedIn {
	t.Helper()
	var usual fakeUser
	e.entra.set(func() {
		usual = e.entra.user
		e.entra.user = fakeUser{oid: fakeGUID(), name: "Alex Wilber", upn: "alex.wilber@contoso.example"}
	})
	defer e.entra.set(func() { e.entra.user = usual })
	return e.signIn(t, signInOptions{})
}

// signInWith runs steps 4 to 7 for client c and returns its tokens.
func (e *testEnv) signInWith(t testing.TB, c *testClient) tokenResponse {
	t.Helper()
	return e.redeem(t, c, e.codeFor(t, c))
}

// signIn runs steps 3 to 7 for a new public client and returns its tokens.
func (e *testEnv) signIn(t testing.TB, opts signInOptions) signedIn {
	t.Helper()
	c := e.newClient(t, `"token_endpoint_auth_method":"none"`)
	c.resource = opts.resource
	return signedIn{e.redeem(t, c, e.codeFor(t, c)), c.id}
}

// sseConn is an open SSE stream and the endpoint to POST to.
type sseConn struct {
	env      *testEnv
	token    string
	endpoint string
	events   *eventReader
	body     io.Closer
	nextID   int
}

// connect opens GET /sse with the token, for as long as the test runs, and
// reads the endpoint event.
func (e *testEnv) connect(t testing.TB, token string) *sseConn {
	t.Helper()
	return e.connectUntil(t, t.Context(), token)
}

// connectUntil opens the stream until ctx is done.
func (e *testEnv) connectUntil(t testing.TB, ctx context.Context, token string) *sseConn {
	t.Helper()
	resp := e.send(t, ctx, "GET", "/sse", nil, bearer(token))
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("GET /sse = %d %s, want 200 text/event-stream", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	events := &eventReader{r: bufio.NewReader(resp.Body)}
	ev, err := events.next()
	if err != nil || ev.event != "endpoint" {
		t.Fatalf("first event = %+v, %v; want endpoint", ev, err)
	}
	return &sseConn{env: e, token: token, endpoint: ev.data, events: events, body: resp.Body, nextID: 1}
}

func (c *sseConn) close() { c.body.Close() }

// post sends one raw message to the session's endpoint.
func (c *sseConn) post(t testing.TB, body string) *http.Response {
	t.Helper()
	return c.env.do(t, "POST", c.endpoint, strings.NewReader(body), bearer(c.token))
}

// rpcReply is a response read from the stream.
type rpcReply struct {
	ID     json.RawMessage
	Result json.RawMessage
	Error  *rpcError
	raw    string
}

// request sends a request, expects 202, and reads its answer from the stream.
func (c *sseConn) request(t testing.TB, method, params string) rpcReply {
	t.Helper()
	msg := fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":%q`, c.nextID, method)
	if params != "" {
		msg += `,"params":` + params
	}
	c.nextID++
	if resp := c.post(t, msg+"}"); resp.StatusCode != http.StatusAccepted {
		t.Fatalf("POST %s = %d, want 202", method, resp.StatusCode)
	}
	ev, err := c.events.next()
	if err != nil || ev.event != "message" {
		t.Fatalf("event after %s = %+v, %v; want a message", method, ev, err)
	}
	reply := rpcReply{raw: ev.data}
	if err := json.Unmarshal([]byte(ev.data), &reply); err != nil {
		t.Fatalf("message %q: %v", ev.data, err)
	}
	return reply
}

// call sends a request and decodes its result into v.
func (c *sseConn) call(t testing.TB, method, params string, v any) {
	t.Helper()
	reply := c.request(t, method, params)
	if reply.Error != nil {
		t.Fatalf("%s: error %+v", method, reply.Error)
	}
	if err := json.Unmarshal(reply.Result, v); err != nil {
		t.Fatalf("%s result %s: %v", method, reply.Result, err)
	}
}

// mcpClient is a Streamable HTTP client of /mcp.
type mcpClient struct {
	env       *testEnv
	token     string
	sessionID string
	version   string
	nextID    int
}

// headers returns the headers of the client's next request: its token,
// session and version, changed by extra (a nil value deletes a header).
func (c *mcpClient) headers(extra http.Header) http.Header {
	h := http.Header{
		"Authorization": {"Bearer " + c.token},
		"Content-Type":  {"application/json"},
		"Accept":        {"application/json, text/event-stream"},
	}
	if c.sessionID != "" {
		h.Set("Mcp-Session-Id", c.sessionID)
	}
	if c.version != "" && c.version != "2025-03-26" {
		h.Set("Mcp-Protocol-Version", c.version)
	}
	for k, v := range extra {
		if v == nil {
			h.Del(k)
		} else {
			h[http.CanonicalHeaderKey(k)] = v
		}
	}
	return h
}

func (c *mcpClient) post(t testing.TB, body string, extra http.Header) *http.Response {
	t.Helper()
	return c.env.do(t, "POST", "/mcp", strings.NewReader(body), c.headers(extra))
}

// modernClient is an MCP 2026-07-28 client: no session, and the protocol
// version in every request.
type modernClient struct {
	env   *testEnv
	token string
}

// headers returns the headers of a request of method, changed by extra (a
// nil value deletes a header).
func (c *modernClient) headers(method string, extra http.Header) http.Header {
	h := (&mcpClient{token: c.token}).headers(http.Header{"Mcp-Protocol-Version": {"2026-07-28"}, "Mcp-Method": {method}})
	if method == "tools/call" {
		h.Set("Mcp-Name", "getUserDetails")
	}
	for k, v := range extra {
		if v == nil {
			h.Del(k)
		} else {
			h[http.CanonicalHeaderKey(k)] = v
		}
	}
	return h
}

// post sends a request of method with params, to which it adds the _meta of
// MCP 2026-07-28.
func (c *modernClient) post(t testing.TB, method, params string, extra http.Header) *http.Response {
	t.Helper()
	var p map[string]any
	if err := json.Unmarshal([]byte(params), &p); err != nil {
		t.Fatal(err)
	}
	p["_meta"] = map[string]any{metaProtocolVersion: "2026-07-28", metaClientCapabilities: map[string]any{},
		"io.modelcontextprotocol/clientInfo": map[string]string{"name": "test", "version": "1"}}
	body, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": 1, "method": method, "params": p})
	return c.env.do(t, "POST", "/mcp", bytes.NewReader(body), c.headers(method, extra))
}

// result expects 200 and a JSON-RPC result, and decodes it into v.
func (c *modernClient) result(t testing.TB, resp *http.Response, v any) {
	t.Helper()
	var r rpcReply
	decodeJSON(t, resp, http.StatusOK, &r)
	if r.Error != nil {
		t.Fatalf("POST /mcp: error %+v", r.Error)
	}
	if err := json.Unmarshal(r.Result, v); err != nil {
		t.Fatal(err)
	}
}

// initialize starts a session at the given version.
func (c *mcpClient) initialize(t testing.TB, version string) {
	t.Helper()
	resp := c.post(t, `{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"`+version+`"}}`, nil)
	var r rpcReply
	decodeJSON(t, resp, http.StatusOK, &r)
	c.sessionID, c.version = resp.Header.Get("Mcp-Session-Id"), version
	if c.sessionID == "" || !strings.Contains(string(r.Result), version) {
		t.Fatalf("initialize %s = %s, session %q", version, r.Result, c.sessionID)
	}
}

// call sends a request and decodes its result into v.
func (c *mcpClient) call(t testing.TB, method, params string, v any) {
	t.Helper()
	c.nextID++
	msg := fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":%q`, c.nextID, method)
	if params != "" {
		msg += `,"params":` + params
	}
	var r rpcReply
	decodeJSON(t, c.post(t, msg+"}", nil), http.StatusOK, &r)
	if r.Error != nil {
		t.Fatalf("%s: error %+v", method, r.Error)
	}
	if err := json.Unmarshal(r.Result, v); err != nil {
		t.Fatalf("%s result %s: %v", method, r.Result, err)
	}
}

// postRaw POSTs body with the headers and returns "<status> <body>"; unlike
// the other helpers, it is safe to call from several goroutines.
func postRaw(ctx context.Context, u string, h http.Header, body string) string {
	req, err := http.NewRequestWithContext(ctx, "POST", u, strings.NewReader(body))
	if err != nil {
		return err.Error()
	}
	req.Header = h
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return fmt.Sprintf("%d %s", resp.StatusCode, b)
}

// eventReader reads server-sent events, skipping comments.
type eventReader struct{ r *bufio.Reader }

type sseEvent struct{ event, data string }

func (er *eventReader) next() (sseEvent, error) {
	var ev sseEvent
	for {
		line, err := er.r.ReadString('\n')
		if err != nil {
			return ev, io.EOF
		}
		line = strings.TrimSuffix(line, "\n")
		switch {
		case line == "" && (ev.event != "" || ev.data != ""):
			return ev, nil
		case strings.HasPrefix(line, "event: "):
			ev.event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			ev.data = strings.TrimPrefix(line, "data: ")
		}
	}
}

// browser is a user's browser: it keeps cookies and stops at every
// redirect, so that each hop of the flow is a step the test checks.
type browser struct {
	client *http.Client
	header http.Header
}

func newBrowser(t testing.TB) *browser {
	jar, _ := cookiejar.New(nil)
	return &browser{client: &http.Client{
		Jar:           jar,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
}

func (b *browser) get(t testing.TB, u string) *http.Response {
	t.Helper()
	return b.send(t, "GET", u, nil, "")
}

func (b *browser) postForm(t testing.TB, u string, form url.Values) *http.Response {
	t.Helper()
	return b.send(t, "POST", u, strings.NewReader(form.Encode()), "application/x-www-form-urlencoded")
}

func (b *browser) send(t testing.TB, method, u string, body io.Reader, contentType string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, u, body)
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for k, v := range b.header {
		req.Header[k] = v
	}
	resp, err := b.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// Assertions and small helpers.

func bearer(token string) http.Header { return http.Header{"Authorization": {"Bearer " + token}} }

func readBody(t testing.TB, resp *http.Response) string {
	t.Helper()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func decodeJSON(t testing.TB, resp *http.Response, wantStatus int, v any) {
	t.Helper()
	body := readBody(t, resp)
	if resp.StatusCode != wantStatus {
		t.Fatalf("%s %s = %d, want %d: %s", resp.Request.Method, resp.Request.URL.Path, resp.StatusCode, wantStatus, body)
	}
	if err := json.Unmarshal([]byte(body), v); err != nil {
		t.Fatalf("%s %s: %v in %s", resp.Request.Method, resp.Request.URL.Path, err, body)
	}
}

// wantOAuthError checks an OAuth JSON error response.
func wantOAuthError(t testing.TB, resp *http.Response, wantStatus int, wantError string) {
	t.Helper()
	var e struct{ Error, ErrorDescription string }
	decodeJSON(t, resp, wantStatus, &e)
	if e.Error != wantError {
		t.Errorf("%s %s: error = %q, want %q", resp.Request.Method, resp.Request.URL.Path, e.Error, wantError)
	}
	if resp.Header.Get("Cache-Control") != "no-store" {
		t.Errorf("%s %s: Cache-Control = %q, want no-store", resp.Request.Method, resp.Request.URL.Path, resp.Header.Get("Cache-Control"))
	}
}

// location checks that resp redirects with the status and returns where to.
func location(t testing.TB, resp *http.Response, wantStatus int) *url.URL {
	t.Helper()
	if resp.StatusCode != wantStatus {
		t.Fatalf("%s %s = %d, want %d: %s", resp.Request.Method, resp.Request.URL, resp.StatusCode, wantStatus, readBody(t, resp))
	}
	u, err := url.Parse(resp.Header.Get("Location"))
	if err != nil || u.String() == "" {
		t.Fatalf("Location %q: %v", resp.Header.Get("Location"), err)
	}
	return u
}

var consentIDPattern = regexp.MustCompile(`name="consent_id" value="([^"]+)"`)

func consentIDFrom(t testing.TB, page string) string {
	t.Helper()
	m := consentIDPattern.FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no consent_id in page:\n%s", page)
	}
	return m[1]
}

// tokenClaims decodes a session token's claims without verifying it.
func tokenClaims(t testing.TB, token string) map[string]any {
	t.Helper()
	_, payload, _, ok := cut3(token)
	b, err := base64.RawURLEncoding.DecodeString(payload)
	var claims map[string]any
	if !ok || err != nil || json.Unmarshal(b, &claims) != nil {
		t.Fatalf("token %q is not JWT-shaped", token)
	}
	return claims
}

// cut3 splits a JWT-shaped token into its three parts.
func cut3(token string) (header, payload, sig string, ok bool) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return "", "", "", false
	}
	return parts[0], parts[1], parts[2], true
}

// testClock is the injected clock: tests move it; nothing sleeps.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// lockedBuffer collects log output written from many goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// The fake Entra ID.

// fakeUser is the user the fake signs in.
type fakeUser struct{ oid, name, upn string }

type fakeEntraOptions struct {
	redirectURI string           // the one redirect URI of the app registration
	interactive bool             // show a sign-in page instead of signing in at once (demo)
	now         func() time.Time // the fake's clock
}

// fakeEntra is a local Microsoft Entra ID (v2.0 endpoints) with one tenant,
// one app registration (a Web app with a secret) and one user, plus
// Microsoft Graph's /v1.0/me. Its checks follow Entra's, in Entra's order,
// with Entra's errors (error, AADSTS code, trace and correlation ids).
type fakeEntra struct {
	*httptest.Server
	tenantID, clientID string
	redirectURI        string
	interactive        bool
	now                func() time.Time
	key                *rsa.PrivateKey

	mu              sync.Mutex
	clientSecret    string
	user            fakeUser
	codes           map[string]*fakeCode
	refreshTokens   map[string]fakeGrant
	accessTokens    map[string]fakeGrant
	lastAT          string
	authorizeError  string               // knob: the next sign-ins fail with this error
	idTokenEdit     func(map[string]any) // knob: tamper with issued id_tokens
	graphStatus     int                  // knob: Graph fails with this status
	graphArrived    chan struct{}        // knob, with graphHold: told when a call reaches Graph...
	graphHold       chan struct{}        // ...which answers only once this is closed
	expiresIn       int                  // knob: lifetime of access tokens in seconds (default 3600)
	refreshRevoked  bool                 // knob: refresh tokens fail as after "revoke sessions" (AADSTS50173)
	keepRT          bool                 // knob: refresh responses carry no new refresh token
	refreshError    string               // knob: refresh_token grants fail with this error
	noOfflineAccess bool                 // knob: the user did not consent to offline_access: no refresh tokens
	refreshes       []url.Values         // refresh_token grants received, for assertions
	lastRT          string               // the last refresh token issued
	graphToken      string               // the last access token Graph accepted
	idTokenHeader   map[string]any       // knob: header fields of issued id_tokens (alg, kid)
	idTokenSigner   *rsa.PrivateKey      // knob: sign id_tokens with this key instead
	jwksFetches     int                  // how often the key set was fetched
	jwksDown        bool                 // knob: the key set cannot be fetched
	connections     int                  // TCP connections accepted
	busy            atomic.Int64         // time spent handling requests, in ns
	busyToken       atomic.Int64         // the part of busy spent at the token endpoint
	lastIDToken     string               // the last id_token issued

	// Secretless credentials the app registration accepts, besides its
	// secret: a certificate, and one federated identity credential.
	certificate   *x509.Certificate
	federation    *fakeFederation
	assertionIDs  map[string]bool // jti of certificate assertions seen: each works once
	lastAssertion string          // the last client assertion accepted
}

// fakeFederation is a federated identity credential: tokens of this issuer,
// for this subject, signed by its key, stand for the app.
type fakeFederation struct {
	issuer, subject string
	key             *rsa.PublicKey
}

type fakeCode struct {
	clientID, redirectURI, scope, challenge, method, nonce string
	user                                                   fakeUser
	expires                                                time.Time
	used                                                   bool
}

type fakeGrant struct {
	user    fakeUser
	scope   string
	expires time.Time
}

func newFakeEntra(t testing.TB, opts fakeEntraOptions) *fakeEntra {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	if opts.now == nil {
		opts.now = time.Now
	}
	f := &fakeEntra{
		tenantID:      "11111111-1111-1111-1111-111111111111",
		clientID:      "33333333-3333-3333-3333-333333333333",
		clientSecret:  "fake~secret~" + rand.Text(),
		redirectURI:   opts.redirectURI,
		interactive:   opts.interactive,
		now:           opts.now,
		key:           key,
		user:          fakeUser{oid: "44444444-4444-4444-4444-444444444444", name: "Adele Vance", upn: "adele.vance@contoso.example"},
		codes:         map[string]*fakeCode{},
		refreshTokens: map[string]fakeGrant{},
		accessTokens:  map[string]fakeGrant{},
		assertionIDs:  map[string]bool{},
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{tenant}/v2.0/.well-known/openid-configuration", f.discovery)
	mux.HandleFunc("GET /{tenant}/discovery/v2.0/keys", f.keys)
	mux.HandleFunc("GET /{tenant}/oauth2/v2.0/authorize", f.authorize)
	mux.HandleFunc("/{tenant}/oauth2/v2.0/token", f.token)
	mux.HandleFunc("GET /v1.0/me", f.me)
	f.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		mux.ServeHTTP(w, r)
		f.busy.Add(int64(time.Since(start)))
		if strings.HasSuffix(r.URL.Path, "/token") {
			f.busyToken.Add(int64(time.Since(start)))
		}
	}))
	f.Config.ConnState = func(_ net.Conn, state http.ConnState) {
		if state == http.StateNew {
			f.set(func() { f.connections++ })
		}
	}
	f.Start()
	t.Cleanup(f.Close)
	return f
}

// set changes the fake's state under its lock.
func (f *fakeEntra) set(change func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	change()
}

func (f *fakeEntra) lastRefreshToken() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lastRT
}

func (f *fakeEntra) refreshCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.refreshes)
}

func (f *fakeEntra) lastAccessToken() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lastAT
}

// knownTenant reports whether the path's tenant segment names this tenant:
// its id, its domain name, or organizations or common.
func (f *fakeEntra) knownTenant(r *http.Request) bool {
	return slices.Contains([]string{f.tenantID, fakeTenantDomain, "organizations", "common"}, r.PathValue("tenant"))
}

// fakeTenantDomain is the fake tenant's verified domain name.
const fakeTenantDomain = "contoso.example"

// rotateKey replaces the fake's signing key, as Entra does now and then.
func (f *fakeEntra) rotateKey(t testing.TB) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	f.set(func() { f.key = key })
}

func (f *fakeEntra) discovery(w http.ResponseWriter, r *http.Request) {
	if !f.knownTenant(r) {
		f.tokenError(w, http.StatusBadRequest, "invalid_tenant", 90002, "Tenant not found.")
		return
	}
	issuer := f.URL + "/" + f.tenantID + "/v2.0"
	if t := r.PathValue("tenant"); t == "organizations" || t == "common" {
		issuer = f.URL + "/{tenantid}/v2.0" // the template issuer of organizations and common
	}
	base := f.URL + "/" + r.PathValue("tenant")
	json.NewEncoder(w).Encode(map[string]any{
		"issuer":                                issuer,
		"authorization_endpoint":                base + "/oauth2/v2.0/authorize",
		"token_endpoint":                        base + "/oauth2/v2.0/token",
		"jwks_uri":                              base + "/discovery/v2.0/keys",
		"response_types_supported":              []string{"code", "id_token", "code id_token", "id_token token"},
		"subject_types_supported":               []string{"pairwise"},
		"id_token_signing_alg_values_supported": []string{"RS256"},
		"scopes_supported":                      []string{"openid", "profile", "email", "offline_access"},
		"token_endpoint_auth_methods_supported": []string{"client_secret_post", "private_key_jwt", "client_secret_basic"},
	})
}

func (f *fakeEntra) keys(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.jwksFetches++
	if f.jwksDown {
		http.Error(w, "unavailable", http.StatusServiceUnavailable)
		return
	}
	pub := f.key.PublicKey
	json.NewEncoder(w).Encode(map[string]any{"keys": []map[string]any{{
		"kty": "RSA", "use": "sig", "kid": f.kid(), "x5t": f.kid(),
		"n": base64.RawURLEncoding.EncodeToString(pub.N.Bytes()),
		"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(pub.E)).Bytes()),
	}}})
}

func (f *fakeEntra) kid() string {
	sum := sha256.Sum256(f.key.PublicKey.N.Bytes())
	return base64.RawURLEncoding.EncodeToString(sum[:20])
}

// authorize is Entra's authorize endpoint. Problems with the tenant, client
// or redirect URI are shown on Entra's own page; the rest are redirected.
func (f *fakeEntra) authorize(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	switch {
	case !f.knownTenant(r):
		f.errorPage(w, 90002, "Tenant not found.")
		return
	case q.Get("client_id") != f.clientID:
		f.errorPage(w, 700016, "Application not found in the directory.")
		return
	case q.Get("redirect_uri") != f.redirectURI:
		f.errorPage(w, 50011, "The redirect URI specified in the request does not match the redirect URIs configured for the application.")
		return
	}
	fail := func(code string, aadsts int, msg string) {
		f.redirectError(w, r, code, aadsts, msg)
	}
	scopes := strings.Fields(q.Get("scope"))
	switch {
	case q.Get("response_type") != "code":
		fail("unsupported_response_type", 700054, "response_type is not enabled for the application.")
		return
	case len(scopes) == 0:
		fail("invalid_request", 900144, "The request body must contain the following parameter: 'scope'.")
		return
	case slices.ContainsFunc(scopes, func(s string) bool {
		return !slices.Contains([]string{"openid", "profile", "email", "offline_access", "User.Read", "https://graph.microsoft.com/User.Read"}, s)
	}):
		fail("invalid_scope", 70011, "The provided value for the input parameter 'scope' is not valid.")
		return
	case q.Has("code_challenge") && (!slices.Contains([]string{"S256", "plain"}, q.Get("code_challenge_method")) || !isPKCEValue(q.Get("code_challenge"))):
		fail("invalid_request", 501491, "Invalid size of Code_Challenge parameter.")
		return
	case q.Has("resource"):
		fail("invalid_target", 9010010, "The resource parameter provided in the request doesn't match with the requested scopes.")
		return
	}

	if f.interactive && q.Get("fake_decision") == "" {
		f.signInPage(w, q)
		return
	}
	f.mu.Lock()
	authErr, user := f.authorizeError, f.user
	f.mu.Unlock()
	switch {
	case q.Get("fake_decision") == "cancel" || authErr == "access_denied":
		fail("access_denied", 50126, "The user canceled the authentication.")
		return
	case authErr == "consent_required":
		fail("consent_required", 65001, "The user or administrator has not consented to use the application.")
		return
	case authErr != "":
		fail(authErr, 90033, "A transient error has occurred. Please try again.")
		return
	}

	code := "0.AAAA" + rand.Text() + rand.Text()
	f.mu.Lock()
	f.codes[code] = &fakeCode{clientID: q.Get("client_id"), redirectURI: q.Get("redirect_uri"), scope: q.Get("scope"),
		challenge: q.Get("code_challenge"), method: q.Get("code_challenge_method"), nonce: q.Get("nonce"), user: user,
		expires: f.now().Add(10 * time.Minute)}
	f.mu.Unlock()
	u, _ := url.Parse(q.Get("redirect_uri"))
	u.RawQuery = url.Values{"code": {code}, "state": {q.Get("state")}, "session_state": {fakeGUID()}}.Encode()
	http.Redirect(w, r, u.String(), http.StatusFound)
}

// signInPage stands in for Entra's sign-in page in the demo.
func (f *fakeEntra) signInPage(w http.ResponseWriter, q url.Values) {
	f.mu.Lock()
	user := f.user
	f.mu.Unlock()
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	fakeSignInPage.Execute(w, struct {
		User   fakeUser
		Params url.Values
	}{user, q})
}

var fakeSignInPage = template.Must(template.New("signin").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in (fake Entra ID)</title>
<style>body{font-family:system-ui,sans-serif;max-width:30rem;margin:3rem auto}button{font-size:1rem;padding:.5rem 1.2rem}</style></head><body>
<p><em>Fake Microsoft Entra ID, for the local demo.</em></p>
<h1>Sign in</h1><p>Sign in as <strong>{{.User.Name}}</strong> ({{.User.UPN}})?</p>
<form method="get">{{range $k, $vs := .Params}}{{range $vs}}<input type="hidden" name="{{$k}}" value="{{.}}">{{end}}{{end}}
<button name="fake_decision" value="signin">Sign in</button> <button name="fake_decision" value="cancel">Cancel</button></form>
</body></html>`))

// Name and UPN are exported for the template.
func (u fakeUser) Name() string { return u.name }
func (u fakeUser) UPN() string  { return u.upn }

func (f *fakeEntra) errorPage(w http.ResponseWriter, aadsts int, msg string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(http.StatusBadRequest)
	fmt.Fprintf(w, "<p>Sorry, but we're having trouble signing you in.</p><p>AADSTS%d: %s</p>", aadsts, template.HTMLEscapeString(msg))
}

func (f *fakeEntra) redirectError(w http.ResponseWriter, r *http.Request, code string, aadsts int, msg string) {
	u, _ := url.Parse(r.URL.Query().Get("redirect_uri"))
	u.RawQuery = url.Values{
		"error":             {code},
		"error_description": {f.description(aadsts, msg)},
		"error_uri":         {fmt.Sprintf("https://login.microsoftonline.com/error?code=%d", aadsts)},
		"state":             {r.URL.Query().Get("state")},
	}.Encode()
	http.Redirect(w, r, u.String(), http.StatusFound)
}

func (f *fakeEntra) description(aadsts int, msg string) string {
	return fmt.Sprintf("AADSTS%d: %s\r\nTrace ID: %s\r\nCorrelation ID: %s\r\nTimestamp: %s",
		aadsts, msg, fakeGUID(), fakeGUID(), f.now().UTC().Format("2006-01-02 15:04:05Z"))
}

// checkAssertion checks a client assertion as Entra ID does, and returns the
// AADSTS code and message of the first thing wrong, or 0. One whose issuer
// is the app is a certificate credential: signed (PS256, or RS256) by the
// key of the registered certificate its x5t#S256 names, for this token
// endpoint, iss = sub = the app, in its lifetime, its jti never seen. Any
// other is a federated token: signed by the trusted issuer, for its subject,
// for the audience api://AzureADTokenExchange, unexpired; the platform sends
// one token until it replaces it, so a jti may come again. f.mu is held.
func (f *fakeEntra) checkAssertion(assertionType, assertion, path string) (int, string) {
	if assertionType != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
		return 700030, "Invalid client_assertion_type."
	}
	parts := strings.Split(assertion, ".")
	var header struct {
		Alg, Typ string
		X5tS256  string `json:"x5t#S256"`
	}
	var claims struct {
		Aud, Iss, Sub, Jti string
		Exp, Nbf           int64
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[len(parts)-1])
	if len(parts) != 3 || err != nil || decodeSegment(parts[0], &header) != nil || decodeSegment(parts[1], &claims) != nil {
		return 50027, "JWT token is invalid or malformed."
	}
	digest := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	verify := func(key *rsa.PublicKey) bool {
		switch header.Alg {
		case "PS256":
			return rsa.VerifyPSS(key, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}) == nil
		case "RS256":
			return rsa.VerifyPKCS1v15(key, crypto.SHA256, digest[:], sig) == nil
		}
		return false
	}
	now := f.now().Unix()
	expired := now >= claims.Exp || now < claims.Nbf-300
	if claims.Iss != f.clientID { // a federated token
		fed := f.federation
		switch {
		case fed == nil || claims.Iss != fed.issuer:
			return 700211, "No matching federated identity record found for presented assertion issuer."
		case !verify(fed.key):
			return 700027, "Client assertion failed signature validation."
		case claims.Aud != "api://AzureADTokenExchange":
			return 700212, "No matching federated identity record found for presented assertion audience."
		case claims.Sub != fed.subject:
			return 700213, "No matching federated identity record found for presented assertion subject."
		case expired:
			return 700024, "Client assertion is not within its valid time range."
		}
		return 0, ""
	}
	cert := f.certificate
	switch {
	case cert == nil || header.X5tS256 != thumbprint(cert):
		return 700027, "The certificate with identifier used to sign the client assertion is not registered on application."
	case !verify(cert.PublicKey.(*rsa.PublicKey)):
		return 700027, "Client assertion failed signature validation."
	case claims.Sub != f.clientID:
		return 700021, "Client assertion application identifier doesn't match 'client_id' parameter."
	case claims.Aud != f.URL+path:
		return 700023, "Client assertion audience claim does not match Realm issuer."
	case expired:
		return 700024, "Client assertion is not within its valid time range."
	case claims.Jti == "" || f.assertionIDs[claims.Jti]:
		return 700027, "Client assertion contains an invalid or reused jti."
	}
	f.assertionIDs[claims.Jti] = true
	return 0, ""
}

// thumbprint is a certificate's x5t#S256.
func thumbprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// decodeSegment decodes a JWT segment's JSON into v.
func decodeSegment(segment string, v any) error {
	b, err := base64.RawURLEncoding.DecodeString(segment)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// tokenError writes Entra's token-endpoint error JSON.
func (f *fakeEntra) tokenError(w http.ResponseWriter, status int, code string, aadsts int, msg string) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{
		"error": code, "error_description": f.description(aadsts, msg), "error_codes": []int{aadsts},
		"timestamp": f.now().UTC().Format("2006-01-02 15:04:05Z"), "trace_id": fakeGUID(), "correlation_id": fakeGUID(),
		"error_uri": fmt.Sprintf("https://login.microsoftonline.com/error?code=%d", aadsts),
	})
}

// token is Entra's token endpoint: client authentication, then the grant.
func (f *fakeEntra) token(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		f.tokenError(w, 400, "invalid_request", 900561, "The endpoint only accepts POST requests.")
		return
	}
	if err := r.ParseForm(); err != nil {
		f.tokenError(w, 400, "invalid_request", 900144, "The request body must be form-encoded.")
		return
	}
	form := r.PostForm
	grant := form.Get("grant_type")
	if grant == "" {
		f.tokenError(w, 400, "invalid_request", 900144, "The request body must contain the following parameter: 'grant_type'.")
		return
	}
	if grant != "authorization_code" && grant != "refresh_token" {
		f.tokenError(w, 400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
		return
	}
	id, secret, basic := r.BasicAuth()
	if basic && form.Has("client_secret") {
		f.tokenError(w, 400, "invalid_request", 90014, "Use one client authentication method.")
		return
	}
	if !basic {
		id, secret = form.Get("client_id"), form.Get("client_secret")
	}
	assertion := form.Get("client_assertion")
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case id != f.clientID:
		f.tokenError(w, 400, "unauthorized_client", 700016, "Application not found in the directory.")
		return
	case secret != "" && (assertion != "" || form.Has("client_assertion_type")):
		f.tokenError(w, 400, "invalid_request", 90014, "Use one client authentication method: client_secret or client_assertion.")
		return
	case secret == "" && assertion == "":
		f.tokenError(w, 401, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
		return
	case assertion != "":
		if aadsts, msg := f.checkAssertion(form.Get("client_assertion_type"), assertion, r.URL.Path); aadsts != 0 {
			f.tokenError(w, 401, "invalid_client", aadsts, msg)
			return
		}
		f.lastAssertion = assertion
	case secret != f.clientSecret:
		f.tokenError(w, 401, "invalid_client", 7000215, "Invalid client secret provided.")
		return
	}

	var user fakeUser
	var scope, nonce string
	if grant == "authorization_code" {
		c, ok := f.codes[form.Get("code")]
		switch {
		case !ok:
			f.tokenError(w, 400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
			return
		case c.used:
			f.tokenError(w, 400, "invalid_grant", 54005, "OAuth2 Authorization code was already redeemed.")
			return
		case !f.now().Before(c.expires):
			f.tokenError(w, 400, "invalid_grant", 70008, "The provided authorization code or refresh token has expired due to inactivity.")
			return
		case c.clientID != id:
			f.tokenError(w, 400, "invalid_grant", 70000, "The provided grant is invalid or malformed.")
			return
		case form.Get("redirect_uri") != c.redirectURI:
			f.tokenError(w, 400, "invalid_grant", 50011, "The reply address does not match the reply address provided when requesting the authorization code.")
			return
		case c.challenge != "" && !pkceMatches(form.Get("code_verifier"), c.challenge, c.method):
			f.tokenError(w, 400, "invalid_grant", 501481, "The Code_Verifier does not match the code_challenge supplied in the authorization request.")
			return
		}
		c.used = true // only on success, as Entra does
		user, scope, nonce = c.user, c.scope, c.nonce
	} else {
		g, ok := f.refreshTokens[form.Get("refresh_token")]
		f.refreshes = append(f.refreshes, form)
		switch {
		case !ok || !f.now().Before(g.expires):
			f.tokenError(w, 400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
			return
		case f.refreshRevoked:
			f.tokenError(w, 400, "invalid_grant", 50173, "The provided grant has expired due to it being revoked.")
			return
		case f.refreshError == "interaction_required":
			f.tokenError(w, 400, "interaction_required", 50076, "Due to a configuration change you must use multi-factor authentication.")
			return
		case f.refreshError != "":
			f.tokenError(w, 503, f.refreshError, 90033, "A transient error has occurred. Please try again.")
			return
		}
		user, scope = g.user, g.scope // Entra rotates but leaves the old refresh token valid
	}

	scopes := strings.Fields(scope)
	expiresIn := cmp.Or(f.expiresIn, 3600)
	at := "fake-at." + rand.Text() // opaque: nothing can parse it, as with real Graph tokens
	f.accessTokens[at] = fakeGrant{user: user, scope: scope, expires: f.now().Add(time.Duration(expiresIn) * time.Second)}
	f.lastAT = at
	resp := map[string]any{
		"token_type": "Bearer", "scope": "openid profile offline_access https://graph.microsoft.com/User.Read",
		"expires_in": expiresIn, "ext_expires_in": expiresIn, "access_token": at,
	}
	if slices.Contains(scopes, "offline_access") && !f.noOfflineAccess && !(grant == "refresh_token" && f.keepRT) {
		rt := "1.AAAA" + rand.Text() + rand.Text()
		f.refreshTokens[rt] = fakeGrant{user: user, scope: scope, expires: f.now().Add(90 * 24 * time.Hour)}
		resp["refresh_token"] = rt
		f.lastRT = rt
	}
	if slices.Contains(scopes, "openid") {
		resp["id_token"] = f.signIDToken(user, nonce)
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store, no-cache")
	json.NewEncoder(w).Encode(resp)
}

func pkceMatches(verifier, challenge, method string) bool {
	if !isPKCEValue(verifier) {
		return false
	}
	if method == "plain" {
		return verifier == challenge
	}
	return s256(verifier) == challenge
}

// signIDToken mints an RS256 id_token with Entra's v2.0 claims; f.mu is held.
func (f *fakeEntra) signIDToken(user fakeUser, nonce string) string {
	now := f.now()
	claims := map[string]any{
		"aud": f.clientID, "iss": f.URL + "/" + f.tenantID + "/v2.0", "iat": now.Unix(), "nbf": now.Unix(),
		"exp": now.Add(time.Hour).Unix(), "name": user.name, "oid": user.oid, "preferred_username": user.upn,
		"sub": base64.RawURLEncoding.EncodeToString([]byte(user.oid))[:43], "tid": f.tenantID, "ver": "2.0",
		"rh": "0.AAAA", "uti": rand.Text(), "aio": rand.Text(),
	}
	if nonce != "" {
		claims["nonce"] = nonce
	}
	if f.idTokenEdit != nil {
		f.idTokenEdit(claims)
	}
	f.lastIDToken = f.sign(claims)
	return f.lastIDToken
}

// mintIDToken signs arbitrary claims, for tests that present an Entra token.
func (f *fakeEntra) mintIDToken(claims map[string]any) string {
	return f.sign(claims)
}

func (f *fakeEntra) sign(claims map[string]any) string {
	h := map[string]any{"typ": "JWT", "alg": "RS256", "kid": f.kid()}
	maps.Copy(h, f.idTokenHeader)
	header, _ := json.Marshal(h)
	payload, _ := json.Marshal(claims)
	signed := base64.RawURLEncoding.EncodeToString(header) + "." + base64.RawURLEncoding.EncodeToString(payload)
	if h["alg"] == "none" {
		return signed + "."
	}
	sum := sha256.Sum256([]byte(signed))
	sig, _ := rsa.SignPKCS1v15(nil, cmp.Or(f.idTokenSigner, f.key), crypto.SHA256, sum[:])
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// me is Microsoft Graph's GET /v1.0/me: only access tokens this fake issued,
// unexpired, with User.Read.
func (f *fakeEntra) me(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	arrived, hold := f.graphArrived, f.graphHold
	f.mu.Unlock()
	if hold != nil { // knob: a slow Graph, held until the test lets go
		arrived <- struct{}{}
		<-hold
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	graphError := func(status int, code, msg string) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("request-id", fakeGUID())
		if status == http.StatusUnauthorized {
			w.Header().Set("WWW-Authenticate", `Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", client_id="00000003-0000-0000-c000-000000000000"`)
		}
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(map[string]any{"error": map[string]any{"code": code, "message": msg}})
	}
	switch f.graphStatus {
	case 0:
	case http.StatusUnauthorized:
		graphError(401, "InvalidAuthenticationToken", "Access token validation failure.")
		return
	default:
		graphError(f.graphStatus, "serviceNotAvailable", "Service unavailable.")
		return
	}
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	g, known := f.accessTokens[token]
	switch {
	case !ok || token == "":
		graphError(401, "InvalidAuthenticationToken", "Access token is empty.")
	case !known:
		graphError(401, "InvalidAuthenticationToken", "IDX14100: JWT is not well formed.")
	case !f.now().Before(g.expires):
		graphError(401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired.")
	case !strings.Contains(g.scope, "User.Read"):
		graphError(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.")
	default:
		f.graphToken = token
		w.Header().Set("Content-Type", "application/json;odata.metadata=minimal")
		json.NewEncoder(w).Encode(map[string]any{
			"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users/$entity",
			"businessPhones": []string{}, "displayName": g.user.name, "givenName": strings.Fields(g.user.name)[0],
			"jobTitle": nil, "mail": g.user.upn, "mobilePhone": nil, "officeLocation": nil, "preferredLanguage": nil,
			"surname": nil, "userPrincipalName": g.user.upn, "id": g.user.oid,
		})
	}
}

func fakeGUID() string {
	b := randomBytes(16)
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
