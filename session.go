package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/oauth2"
)

// Session mapping: steps 1, 7 and 10 of the flow.
//
// After a sign-in, the Entra tokens stay here, in a [session]. The client gets
// a session token instead: a JWT-shaped string, HMAC-signed by this server,
// that names the session and nothing else about the user, and a refresh token
// that rotates. Every MCP request carries the session token (step 1 checks
// it); the server maps it back to the session and, from there, to the Entra
// token, which it keeps fresh itself (step 10).
//
// This is the "session binding" of MCP 2025-03-26 "Third-Party Authorization
// Flow": the client never sees, and can never present, a token from Entra ID
// (MCP 2025-06-18 "Token Passthrough").

// A session is one sign-in of one user through one client.
type session struct {
	id       string
	subject  string    // opaque user id for tokens and logs, derived from tid+oid
	user     entraUser // who signed in, for tools that need more than the Entra token
	clientID string
	scope    string
	resource string      // the audience granted: its tokens', or one that holds theirs (see [server.tokenAudience])
	ended    atomic.Bool // set once by endSession; an ended session never comes back

	refreshing sync.Mutex // held while the Entra tokens are refreshed: one refresh at a time

	mu          sync.Mutex    // guards what follows
	entraToken  *oauth2.Token // Entra's access and refresh tokens
	entraExpiry time.Time     // when entraToken's access token expires, by our clock
	refreshGen  uint64        // generation of the one refresh token of ours that works now
	rotatedAt   time.Time     // when refreshGen began: the issue time of its tokens
}

// Step 1: the challenge.

// authenticate checks the bearer token of a request to an MCP endpoint and
// returns its session: one whose MAC and expiry check out, for this server or
// this endpoint, of a session that still exists. Entra tokens, whatever their
// shape, fail the MAC. Otherwise it answers 401 with a challenge pointing at
// the endpoint's protected-resource metadata (RFC 9728 §5.1).
func (s *server) authenticate(w http.ResponseWriter, r *http.Request, endpoint string) *session {
	scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if !strings.EqualFold(scheme, "Bearer") {
		s.writeChallenge(w, endpoint, "") // no token: sign in first
		return nil
	}
	claims, err := s.tokens.verify(strings.TrimSpace(token))
	switch {
	case errors.Is(err, errTokenExpired):
		s.writeChallenge(w, endpoint, "the access token expired")
		return nil
	case err != nil:
		s.writeChallenge(w, endpoint, "the access token is invalid")
		return nil
	case claims.Audience != s.cfg.publicURL && claims.Audience != s.cfg.publicURL+endpoint:
		s.writeChallenge(w, endpoint, "the access token is for another resource")
		return nil
	}
	sess, ok := s.sessions.get(claims.SessionID)
	if !ok || sess.ended.Load() || sess.clientID != claims.ClientID {
		s.writeChallenge(w, endpoint, errDescSessionEnded)
		return nil
	}
	return sess
}

// Step 7: the server's own tokens.

// startSession makes a signed-in session live and issues its first tokens.
func (s *server) startSession(c *client, sess *session, aud string) (*tokenResponse, error) {
	s.userShares.Lock() // the user's share is counted and taken at once
	defer s.userShares.Unlock()
	s.makeRoomForUser(sess.subject) // past maxSessionsPerUser, the user's oldest sign-in ends
	sess.mu.Lock()
	defer sess.mu.Unlock()
	sess.rotatedAt = s.now()
	return s.issueTokens(c, sess, aud)
}

// issueTokens issues the tokens of the session's current generation: a
// session token and, for clients registered for the refresh_token grant, a
// refresh token (see [sessionCodec.refreshToken]), and keeps the session alive
// as long as that refresh token lives. A generation's tokens are the same
// bytes however often they are issued, so a duplicate refresh gets what the
// first one got (see [server.rotateRefresh]). The access token is for aud:
// the session's resource, or a part of it. sess.mu is held.
func (s *server) issueTokens(c *client, sess *session, aud string) (*tokenResponse, error) {
	issued := sess.rotatedAt
	// exp is in whole seconds, rounded up: a 1s lifetime must not become 0.
	expiry := issued.Add(s.cfg.accessTTL + time.Second - 1).Truncate(time.Second)
	resp := &tokenResponse{
		AccessToken: s.tokens.mint(sessionClaims{
			Audience:  aud,
			Subject:   sess.subject,
			SessionID: sess.id,
			ClientID:  sess.clientID,
			Scope:     sess.scope,
			IssuedAt:  issued.Unix(),
			Expiry:    expiry.Unix(),
			TokenID:   s.tokens.tokenID(sess.id, sess.refreshGen, aud),
		}),
		TokenType: "Bearer",
		ExpiresIn: int64(expiry.Sub(s.now()).Round(time.Second) / time.Second),
		Scope:     sess.scope,
	}
	ttl := s.cfg.accessTTL
	if c.allows("refresh_token") {
		resp.RefreshToken = s.tokens.refreshToken(sess.id, sess.refreshGen)
		ttl = s.cfg.refreshTTL
	}
	if !sess.ended.Load() {
		if err := s.sessions.put(sess.id, sess, ttl); err != nil {
			return nil, err
		}
	}
	return resp, nil
}

// The session token.
//
// Format: base64url(header) "." base64url(claims) "." base64url(mac), where mac
// is HMAC-SHA256 over the first two parts joined by the dot, as in a JWS
// (RFC 7515). The base64url alphabet has no dot, so the MAC input splits one
// way only: bytes cannot move between header and claims without changing it.
// (golang.org/x/net/xsrftoken once joined raw fields with ":" and had to fix
// the resulting collisions, golang/go#34308.)
//
// The header is fixed per key: the verifier compares it byte for byte and
// never reads an "alg" from the token, so alg=none and algorithm swaps fail.

// sessionClaims is the claims part. It names a session, never the user: the
// token is readable by anyone who holds it.
type sessionClaims struct {
	Issuer    string `json:"iss"`
	Audience  string `json:"aud"`
	Subject   string `json:"sub"`
	SessionID string `json:"sid"`
	ClientID  string `json:"client_id"`
	Scope     string `json:"scope"`
	IssuedAt  int64  `json:"iat"`
	Expiry    int64  `json:"exp"`
	TokenID   string `json:"jti"` // unique per token (RFC 9068 §2.2)
}

// sessionCodec mints and verifies session tokens and refresh tokens: signed
// with SESSION_KEY, and accepted under SESSION_KEY_PREVIOUS too, for rotation.
type sessionCodec struct {
	keys       []codecKey // the current key, then the previous one, if any
	subjectKey []byte     // derives opaque subjects from Entra ids
	issuer     string
	now        func() time.Time
}

// mint returns a token carrying claims, signed with the current key, with
// the issuer and a fresh token id filled in.
func (c *sessionCodec) mint(claims sessionClaims) string {
	claims.Issuer = c.issuer
	if claims.TokenID == "" {
		claims.TokenID = newSecret()
	}
	payload, _ := json.Marshal(claims)
	signed := c.keys[0].header + "." + base64.RawURLEncoding.EncodeToString(payload)
	return signed + "." + base64.RawURLEncoding.EncodeToString(macSum(c.keys[0].mac, signed))
}

// verify checks a token's header, MAC, issuer and expiry, in that order, and
// returns its claims. The header names the key; the caller checks the
// audience and the session.
func (c *sessionCodec) verify(token string) (sessionClaims, error) {
	if len(token) > maxTokenLen || !isTokenText(token) {
		return sessionClaims{}, errTokenMalformed
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return sessionClaims{}, errTokenMalformed
	}
	k := c.keyByHeader(parts[0])                                      // the header is fixed per key: no "alg" is ever read
	mac, err := base64.RawURLEncoding.Strict().DecodeString(parts[2]) // one spelling per MAC
	if k == nil || err != nil {
		return sessionClaims{}, errTokenMalformed
	}
	if !hmac.Equal(mac, macSum(k.mac, parts[0]+"."+parts[1])) {
		return sessionClaims{}, errTokenSignature
	}
	// Only now, with the MAC checked, is the payload ours to parse.
	var claims sessionClaims
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil || json.Unmarshal(raw, &claims) != nil {
		return sessionClaims{}, errTokenMalformed
	}
	if claims.Issuer != c.issuer {
		return sessionClaims{}, errTokenIssuer
	}
	if !c.now().Before(time.Unix(claims.Expiry, 0)) {
		return sessionClaims{}, errTokenExpired
	}
	return claims, nil
}

// Step 10: the Entra token, kept fresh on the server.

// entraAccessToken returns the session's Entra access token, refreshing it
// first if it expires within a minute or is the token Graph just refused
// (refused). One refresh runs per session at a time, and callers that arrive
// meanwhile get its result. It runs on a background context (golang.org/x/oauth2
// keeps its context), so a caller that gives up cannot cancel it halfway. If
// Entra refuses because the sign-in is over (the user was signed out or
// disabled, Entra wants them again), the session ends: the client gets 401.
func (s *server) entraAccessToken(sess *session, refused string) (string, error) {
	sess.refreshing.Lock()
	defer sess.refreshing.Unlock()
	if sess.ended.Load() { // while this caller waited
		return "", errSessionEnded
	}
	sess.mu.Lock()
	current, refreshToken, expiry := sess.entraToken.AccessToken, sess.entraToken.RefreshToken, sess.entraExpiry
	sess.mu.Unlock()
	if current != refused && s.now().Before(expiry.Add(-time.Minute)) {
		return current, nil
	}
	if refreshToken == "" {
		s.log.Warn("Entra gave no refresh token (is offline_access granted?); ending the session", "subject", sess.subject)
		s.endSession(sess)
		return "", errSessionEnded
	}
	stale := &oauth2.Token{RefreshToken: refreshToken} // no access token: refresh now
	tok, err := s.entra.oauth.TokenSource(s.entra.background, stale).Token()
	if err != nil {
		return "", s.entraRenewalFailed(sess, err)
	}
	s.log.Info("Entra token renewed", "subject", sess.subject)
	s.setEntraToken(sess, tok)
	s.saveState() // the rotated Entra refresh token must survive a restart
	return tok.AccessToken, nil
}

// ---------------------------------------------------------------------------
// Behind the lesson: refresh-token rotation, lifetimes, keys and their
// rotation, the bounded stores every step keeps its state in, and the state
// file that lets it all survive a restart.

// tokenResponse is the successful token response (RFC 6749 §5.1).
type tokenResponse struct {
	AccessToken  string `json:"access_token"`
	TokenType    string `json:"token_type"`
	ExpiresIn    int64  `json:"expires_in"`
	RefreshToken string `json:"refresh_token,omitempty"`
	Scope        string `json:"scope"`
}

// errSessionEnded reports that Entra ID refused to renew a session's tokens,
// so the session is over and its user must sign in again.
var errSessionEnded = errors.New("the Microsoft sign-in has ended; sign in again")

// setEntraToken stores Entra tokens just received. Entra rotates refresh
// tokens on every use, so the newest one is kept (golang.org/x/oauth2 carries
// the old one over when a response has none). The expiry is taken on our
// clock from expires_in.
func (s *server) setEntraToken(sess *session, tok *oauth2.Token) {
	lifetime := time.Duration(tok.ExpiresIn) * time.Second
	if lifetime <= 0 {
		lifetime = time.Hour // Entra always says; an hour is its usual
	}
	sess.mu.Lock()
	defer sess.mu.Unlock()
	sess.entraToken = tok
	sess.entraExpiry = s.now().Add(lifetime)
}

// entraUser is who signed in, read from the verified id_token. It stays on the
// server: no token the client holds contains it.
type entraUser struct {
	tenantID string // tid
	objectID string // oid
	name     string
	username string // preferred_username
}

// refreshToken returns the refresh token of generation gen of session sid:
// "rt1.<sid>.<gen>.<mac>", the MAC taken over everything before its dot with
// a key of its own. Session ids are base32 and generations decimal, so
// neither holds a dot and the string parses one way only.
func (c *sessionCodec) refreshToken(sid string, gen uint64) string {
	signed := "rt1." + sid + "." + strconv.FormatUint(gen, 10)
	return signed + "." + base64.RawURLEncoding.EncodeToString(macSum(c.keys[0].refresh, signed))
}

// parseRefreshToken checks a refresh token's MAC, under any of the codec's
// keys, and returns its session id and generation.
func (c *sessionCodec) parseRefreshToken(token string) (sid string, gen uint64, ok bool) {
	i := strings.LastIndexByte(token, '.')
	if i < 0 || len(token) > maxTokenLen || !isTokenText(token) {
		return "", 0, false
	}
	mac, err := base64.RawURLEncoding.Strict().DecodeString(token[i+1:])
	if err != nil || !slices.ContainsFunc(c.keys, func(k codecKey) bool { return hmac.Equal(mac, macSum(k.refresh, token[:i])) }) {
		return "", 0, false
	}
	parts := strings.Split(token[:i], ".")
	if len(parts) != 3 || parts[0] != "rt1" {
		return "", 0, false
	}
	gen, err = strconv.ParseUint(parts[2], 10, 64)
	return parts[1], gen, err == nil
}

// endSession ends a session and closes its streams: its access and refresh
// tokens stop working at once, wherever they are. The flag, not only the
// deletion, is what counts: a token request racing with endSession may put
// the session back, ended.
func (s *server) endSession(sess *session) {
	sess.mu.Lock() // so that no token request of the session is halfway through
	sess.ended.Store(true)
	sess.mu.Unlock()
	s.sessions.delete(sess.id)
	s.endMCPSessions(sess.id)
	s.saveState()
}

// entraRenewalFailed logs a failed refresh of the Entra token and returns the
// error for the caller. If Entra refused with one of entraSignInOver (the user
// was signed out, their password changed, the refresh token expired, Entra
// wants the user again), the session ends, and the client's next request gets
// 401 so that it signs in again; other failures leave it for the next try.
func (s *server) entraRenewalFailed(sess *session, err error) error {
	attrs := []any{"subject", sess.subject, "err", err}
	var rerr *oauth2.RetrieveError
	if errors.As(err, &rerr) {
		attrs = append([]any{"subject", sess.subject}, retrieveErrorAttrs(rerr)...) // Entra's codes and ids, not its text
		if slices.Contains(entraSignInOver, rerr.ErrorCode) {
			s.log.Warn("Entra refused to renew the sign-in; ending the session", attrs...)
			s.endSession(sess)
			return errSessionEnded
		}
	}
	s.log.Warn("Entra token refresh failed", attrs...)
	return errors.New("your Microsoft sign-in could not be renewed just now; try again later")
}

// maxSessionsPerUser bounds the signed-in sessions of one user, so that one
// account signing in again and again cannot fill the store for everyone.
const maxSessionsPerUser = 100

// makeRoomForUser ends the sign-in of subject's user that was refreshed
// longest ago, if the user holds maxSessionsPerUser of them: a client that is
// in use refreshes, and keeps its sign-in. s.userShares is held, until the
// new sign-in is stored; no session's lock is.
func (s *server) makeRoomForUser(subject string) {
	var oldest *session
	var oldestAt time.Time
	n := 0
	s.sessions.each(func(sess *session, _ time.Time) {
		if sess.subject != subject || sess.ended.Load() {
			return
		}
		sess.mu.Lock()
		at := sess.rotatedAt
		sess.mu.Unlock()
		if n++; oldest == nil || at.Before(oldestAt) {
			oldest, oldestAt = sess, at
		}
	})
	if n >= maxSessionsPerUser {
		s.log.Info("the user holds too many sign-ins; ending the oldest", "subject", subject, "client_id", oldest.clientID)
		s.endSession(oldest)
	}
}

// writeChallenge answers 401 with the challenge of RFC 9728 §5.1, which
// points the client at the protected-resource metadata of endpoint (MCP
// 2025-06-18 "Authorization Server Location"). A request without a token gets
// no error code (RFC 6750 §3.1); otherwise description says what was wrong
// with it, as an invalid_token error.
func (s *server) writeChallenge(w http.ResponseWriter, endpoint, description string) {
	challenge := fmt.Sprintf(`Bearer resource_metadata="%s/.well-known/oauth-protected-resource%s", scope="%s"`,
		s.cfg.publicURL, endpoint, serverScope)
	if description == "" {
		w.Header().Set("WWW-Authenticate", challenge)
		writeJSON(w, http.StatusUnauthorized, &oauthError{Code: "unauthorized", Description: "sign in first: this endpoint needs a bearer token"})
		return
	}
	w.Header().Set("WWW-Authenticate", challenge+fmt.Sprintf(`, error="invalid_token", error_description="%s"`, description))
	writeJSON(w, http.StatusUnauthorized, &oauthError{Code: "invalid_token", Description: description})
}

// errDescSessionEnded is the 401's description for a token whose session
// has ended.
const errDescSessionEnded = "the session has ended; sign in again"

// Refresh tokens rotate (OAuth 2.1 §4.3.1, required for public clients by
// MCP 2025-06-18): each one works once and comes back replaced. Nothing about
// them is stored: a refresh token is the session id and a generation number,
// signed (see [sessionCodec.refreshToken]), and the session remembers which
// generation works now. That one number is enough to tell a stale token, and
// so a stolen one, from the current one.

// rotateRefresh redeems the refresh token of generation gen of sess:
//   - the current generation: the next one is issued, with a new access
//     token, and the current one stops working. A later generation counts as
//     current too: its MAC proves this server issued it, so a state file that
//     missed a save before a crash merely lags behind;
//   - the previous generation within [server.refreshGrace] of its rotation: a
//     duplicate of that refresh, which gets the same tokens again;
//   - anything older: the token was replaced long ago, so someone kept a
//     copy. The whole session ends, for the thief and the client alike
//     (RFC 9700 §4.14.2).
func (s *server) rotateRefresh(c *client, sess *session, gen uint64, aud string) (*tokenResponse, error) {
	var resp *tokenResponse
	var err error
	reused := false
	sess.mu.Lock()
	switch now := s.now(); {
	case sess.ended.Load():
		err = badRequest("invalid_grant", errDescSessionEnded)
	case gen >= sess.refreshGen:
		sess.refreshGen = gen + 1
		sess.rotatedAt = now
		resp, err = s.issueTokens(c, sess, aud)
	case gen+1 == sess.refreshGen && now.Sub(sess.rotatedAt) < s.refreshGrace():
		resp, err = s.issueTokens(c, sess, aud)
	default:
		reused = true
	}
	sess.mu.Unlock()
	if reused {
		s.log.Warn("replaced refresh token used again; ending its session", "client_id", c.ID, "subject", sess.subject)
		s.endSession(sess)
		return nil, badRequest("invalid_grant", "the refresh token was already used; sign in again")
	}
	return resp, err
}

// refreshGrace is how long a replaced refresh token stays good for a
// duplicate of the refresh that replaced it: clients that lose a response,
// or send the same refresh twice at once, get the same new tokens rather
// than a dead session. Past it, a replaced refresh token means theft. It is
// never more than half the access tokens' lifetime, so that a duplicate never
// gets a token that has already expired.
func (s *server) refreshGrace() time.Duration { return min(30*time.Second, s.cfg.accessTTL/2) }

// Lifetimes of the server's own state.
const (
	consentTTL      = 10 * time.Minute    // a consent page stays usable
	flowTTL         = 10 * time.Minute    // a sign-in at Entra may take
	codeTTL         = 2 * time.Minute     // our authorization codes (OAuth 2.1 §4.1.2: short)
	unusedClientTTL = time.Hour           // a registration that never completes a sign-in
	clientTTL       = 90 * 24 * time.Hour // a registration nobody uses any more
	mcpIdleTTL      = 24 * time.Hour      // a Streamable HTTP session nobody uses
)

// entraSignInOver are the refresh errors after which only a new sign-in
// helps: the grant was revoked or expired, or Entra now wants the user
// (multi-factor, consent, a fresh login).
var entraSignInOver = []string{"invalid_grant", "interaction_required", "consent_required", "login_required"}

// tokenHeader is the header part; ver is the format version, kid names the key.
type tokenHeader struct {
	Alg string `json:"alg"`
	Typ string `json:"typ"`
	Kid string `json:"kid"`
	Ver int    `json:"ver"`
}

var (
	errTokenMalformed = errors.New("session token: malformed")
	errTokenSignature = errors.New("session token: bad signature")
	errTokenExpired   = errors.New("session token: expired")
	errTokenIssuer    = errors.New("session token: wrong issuer")
)

// maxTokenLen bounds what verify reads: real tokens are about 400 bytes.
const maxTokenLen = 4096

// codecKey is the part of the codec that comes from one SESSION_KEY.
type codecKey struct {
	mac     []byte // signs session tokens
	refresh []byte // signs refresh tokens
	state   []byte // encrypts the state file
	header  string // base64url of the fixed token header, naming the key
}

// deriveKey derives a key for one purpose from a SESSION_KEY (HKDF,
// RFC 5869), so that no two purposes ever share a key.
func deriveKey(secret []byte, purpose string) []byte {
	key, err := hkdf.Key(sha256.New, secret, nil, "entra-mcp "+purpose, 32)
	if err != nil {
		panic(err) // only for impossible lengths
	}
	return key
}

// newSessionCodec builds the codec from the current SESSION_KEY and,
// optionally, the previous one.
func newSessionCodec(issuer string, now func() time.Time, secrets ...[]byte) *sessionCodec {
	c := &sessionCodec{subjectKey: deriveKey(secrets[0], "subject v1"), issuer: issuer, now: now}
	for _, secret := range secrets {
		macKey := deriveKey(secret, "session token v1")
		k := codecKey{
			mac:     macKey,
			refresh: deriveKey(secret, "refresh token v1"),
			state:   deriveKey(secret, "state file v1"),
		}
		kid := sha256.Sum256(macKey) // names the key without revealing it
		header, _ := json.Marshal(tokenHeader{Alg: "HS256", Typ: "at+jwt", Kid: hex.EncodeToString(kid[:4]), Ver: 1})
		k.header = base64.RawURLEncoding.EncodeToString(header)
		c.keys = append(c.keys, k)
	}
	return c
}

// isTokenText reports whether s holds only what our tokens are made of: the
// base64url alphabet and dots. Go's base64 decoder skips newlines, so without
// this check one MAC could be spelled many ways.
func isTokenText(s string) bool {
	for i := range len(s) {
		c := s[i]
		if !('A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// keyByHeader returns the key whose fixed token header is header, or nil.
func (c *sessionCodec) keyByHeader(header string) *codecKey {
	for i := range c.keys {
		if c.keys[i].header == header {
			return &c.keys[i]
		}
	}
	return nil
}

// macSum returns HMAC-SHA256 of data under key.
func macSum(key []byte, data string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(data))
	return m.Sum(nil)
}

// tokenID derives the jti of the session token of generation gen of session
// sid for audience aud, so that issuing a generation's tokens again gives the
// same bytes, and tokens for two audiences never share a jti. Neither sid nor
// gen holds a dot, so the input reads one way only.
func (c *sessionCodec) tokenID(sid string, gen uint64, aud string) string {
	mac := macSum(c.keys[0].refresh, "jti."+sid+"."+strconv.FormatUint(gen, 10)+"."+aud)
	return base64.RawURLEncoding.EncodeToString(mac[:16])
}

// subject derives the opaque, stable user id of a token's "sub" from the
// Entra tenant and object ids: the same user gets the same subject for as long
// as SESSION_KEY stays the same, and nobody can tell who it is.
func (c *sessionCodec) subject(u entraUser) string {
	m := hmac.New(sha256.New, c.subjectKey)
	m.Write([]byte(u.tenantID))
	m.Write([]byte{0}) // GUIDs hold no NUL: the pair encodes one way only
	m.Write([]byte(u.objectID))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil)[:16])
}

// newSecret returns a random string with at least 128 bits of entropy, for
// ids, states, nonces, codes and client secrets.
func newSecret() string { return rand.Text() }

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b) // never fails (crypto/rand, Go 1.24+)
	return b
}

// hashKey is the map key under which a secret is stored. Keeping hashes, not
// the secrets, means a memory dump yields no usable code or client secret,
// and a lookup's timing says nothing about the secret.
func hashKey(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return string(sum[:])
}

// sameSecret compares two secrets in constant time.
func sameSecret(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// ttlMap is a map whose entries expire, and which holds at most max of them.
// Every piece of short-lived state lives in one.
//
// Expired entries are removed when a lookup finds them, and all at once when
// a new entry meets a full map. That is all the cleanup there is: no
// goroutine sweeps in the background, and memory stays bounded by max
// whatever clients do. A map full of live entries refuses new ones
// (errStoreFull) and the server answers 503: better a busy server than one
// that runs out of memory. Entries charged to a client (putCharged) are
// never refused: the client holding the most makes room instead.
type ttlMap[V any] struct {
	mu        sync.Mutex
	now       func() time.Time
	max       int
	entries   map[string]ttlEntry[V]
	lastSweep time.Time

	// For entries charged to an owner (see putCharged): their keys by owner,
	// oldest first, and the owners by how many they hold, so that a full
	// map finds one holding the most without a scan.
	charged map[string][]string
	holders []map[string]bool
}

type ttlEntry[V any] struct {
	value   V
	expires time.Time // zero: never
	owner   string    // whom the entry is charged to (see putCharged); "" for none
}

// errStoreFull reports that a ttlMap holds as many live entries as it may.
var errStoreFull = errors.New("the server is holding as much state as it may; try again later")

func newTTLMap[V any](now func() time.Time, max int) *ttlMap[V] {
	return &ttlMap[V]{now: now, max: max, entries: make(map[string]ttlEntry[V]), charged: make(map[string][]string)}
}

// put stores v under key for ttl; a ttl of 0 keeps it until deleted. A new
// key that meets a full map first sweeps out the expired entries (at most once
// a second, so a full map is not swept on every request); if the map is still
// full, put fails with errStoreFull.
func (m *ttlMap[V]) put(key string, v V, ttl time.Duration) error {
	now := m.now()
	var expires time.Time
	if ttl > 0 {
		expires = now.Add(ttl)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.setIfRoom(now, key, ttlEntry[V]{value: v, expires: expires})
}

// setIfRoom sets the entry under key, sweeping a full map first if the key
// is new: errStoreFull if it stays full. m.mu is held.
func (m *ttlMap[V]) setIfRoom(now time.Time, key string, e ttlEntry[V]) error {
	if _, exists := m.entries[key]; !exists && len(m.entries) >= m.max {
		m.sweep(now)
		if len(m.entries) >= m.max {
			return errStoreFull
		}
	}
	m.set(key, e)
	return nil
}

// putAtLeast stores v under key for ttl, or for what the entry it replaces
// had left, if that is longer.
func (m *ttlMap[V]) putAtLeast(key string, v V, ttl time.Duration) error {
	now := m.now()
	m.mu.Lock()
	defer m.mu.Unlock()
	expires := now.Add(ttl)
	if e, ok := m.entries[key]; ok && (e.expires.IsZero() || e.expires.After(expires)) {
		expires = e.expires
	}
	return m.setIfRoom(now, key, ttlEntry[V]{value: v, expires: expires})
}

// putCharged stores v under key for ttl, charged to owner (a client
// address), who may hold quota entries: past that, owner's own oldest makes
// room. A full map makes room too, by dropping the oldest entry of whoever
// holds the most. It never refuses: one client cannot lock the others out
// by filling the map, nor lock itself out by starting over and over.
func (m *ttlMap[V]) putCharged(owner, key string, v V, ttl time.Duration, quota int) {
	now := m.now()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.remove(key)
	if len(m.charged[owner]) >= quota {
		m.remove(m.charged[owner][0])
	}
	if len(m.entries) >= m.max {
		m.sweep(now)
	}
	if len(m.entries) >= m.max {
		if most := m.holdingMost(); most != "" {
			m.remove(m.charged[most][0])
		}
	}
	m.set(key, ttlEntry[V]{value: v, expires: now.Add(ttl), owner: owner})
}

// holdingMost returns an owner holding the most entries, or ""; m.mu is held.
func (m *ttlMap[V]) holdingMost() string {
	for n := len(m.holders) - 1; n > 0; n-- {
		for owner := range m.holders[n] {
			return owner
		}
	}
	return ""
}

// recount moves owner among the holders, from the count it had to the one
// it has now; m.mu is held.
func (m *ttlMap[V]) recount(owner string, had int) {
	if had < len(m.holders) {
		delete(m.holders[had], owner)
	}
	n := len(m.charged[owner])
	for len(m.holders) <= n {
		m.holders = append(m.holders, make(map[string]bool))
	}
	if n > 0 {
		m.holders[n][owner] = true
	}
}

// sweep removes every expired entry, at most once a second, so that a full
// map is not swept on every request; m.mu is held.
func (m *ttlMap[V]) sweep(now time.Time) {
	if now.Sub(m.lastSweep) < time.Second {
		return
	}
	m.lastSweep = now
	for k, e := range m.entries {
		if e.expired(now) {
			m.remove(k)
		}
	}
}

// set and remove change entries, and keep the count of what each owner
// holds; m.mu is held.
func (m *ttlMap[V]) set(key string, e ttlEntry[V]) {
	m.remove(key)
	m.entries[key] = e
	if e.owner != "" {
		m.charged[e.owner] = append(m.charged[e.owner], key)
		m.recount(e.owner, len(m.charged[e.owner])-1)
	}
}

func (m *ttlMap[V]) remove(key string) {
	e, ok := m.entries[key]
	if !ok {
		return
	}
	delete(m.entries, key)
	if e.owner != "" {
		keys := m.charged[e.owner]
		m.charged[e.owner] = slices.DeleteFunc(keys, func(k string) bool { return k == key })
		if len(m.charged[e.owner]) == 0 {
			delete(m.charged, e.owner)
		}
		m.recount(e.owner, len(keys))
	}
}

// touch gives the live entry under key another ttl, if there is one, and
// says how long it had left.
func (m *ttlMap[V]) touch(key string, ttl time.Duration) (left time.Duration, ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.live(key); !ok {
		return 0, false
	}
	e := m.entries[key]
	left, e.expires = e.expires.Sub(m.now()), m.now().Add(ttl)
	m.entries[key] = e
	return left, true
}

// get returns the live entry under key.
func (m *ttlMap[V]) get(key string) (V, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.live(key)
}

// take returns the live entry under key and deletes it: whatever take finds
// is used once.
func (m *ttlMap[V]) take(key string) (V, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.live(key)
	m.remove(key)
	return v, ok
}

func (m *ttlMap[V]) delete(key string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.remove(key)
}

// deleteCharged deletes the entries charged to owner for which del returns
// true: a look at a few entries, not at the whole map.
func (m *ttlMap[V]) deleteCharged(owner string, del func(V) bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, k := range slices.Clone(m.charged[owner]) {
		if del(m.entries[k].value) {
			m.remove(k)
		}
	}
}

// deleteFunc deletes every entry for which del returns true.
func (m *ttlMap[V]) deleteFunc(del func(V) bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for k, e := range m.entries {
		if del(e.value) {
			m.remove(k)
		}
	}
}

// each calls f for every live entry, with its deadline. It calls f after
// releasing the map's lock, so f may take other locks: a session's lock is
// taken before the map's elsewhere, and never the other way round.
func (m *ttlMap[V]) each(f func(v V, expires time.Time)) {
	m.mu.Lock()
	now := m.now()
	live := make([]ttlEntry[V], 0, len(m.entries))
	for _, e := range m.entries {
		if !e.expired(now) {
			live = append(live, e)
		}
	}
	m.mu.Unlock()
	for _, e := range live {
		f(e.value, e.expires)
	}
}

// len returns the number of entries, expired ones not yet removed included.
func (m *ttlMap[V]) len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.entries)
}

// live looks key up; m.mu must be held. An expired entry is removed.
func (m *ttlMap[V]) live(key string) (V, bool) {
	e, ok := m.entries[key]
	if ok && e.expired(m.now()) {
		m.remove(key)
		ok = false
	}
	if !ok {
		var zero V
		return zero, false
	}
	return e.value, true
}

func (e ttlEntry[V]) expired(now time.Time) bool {
	return !e.expires.IsZero() && !now.Before(e.expires)
}

// The state file: restarts lose nothing (when STATE_FILE is set).
//
// The signed-in sessions, Entra tokens included, are written to STATE_FILE
// after every change a restart must not lose, before the response goes out:
// even kill -9 just after loses nothing. The registered clients go to a file
// of their own beside it, STATE_FILE.clients, in the background, a few
// seconds after they change: a token request never waits for other clients'
// registrations to be written, and a flood of registrations costs no one
// else anything. Each file is JSON sealed with AES-256-GCM under a key
// derived from SESSION_KEY, written to a temporary file (mode 0600) and
// renamed over the old one, so that it is always whole. What is not kept:
// consents, sign-ins in progress and codes (minutes long; the user starts
// again), and MCP sessions (clients start a new one when they get 404).

// savedState is what a state file holds, once opened: the sessions in
// STATE_FILE, the clients in STATE_FILE.clients (both, in a version 1 file).
type savedState struct {
	Clients  []savedClient  `json:"clients"`
	Sessions []savedSession `json:"sessions"`
}

type savedClient struct {
	Metadata   clientMetadata `json:"metadata"`
	ID         string         `json:"id"`
	IssuedAt   int64          `json:"issued_at"`
	SecretHash []byte         `json:"secret_hash,omitempty"`
	Expires    time.Time      `json:"expires"`
}

type savedSession struct {
	ID          string        `json:"id"`
	Subject     string        `json:"subject"`
	TenantID    string        `json:"tid"`
	ObjectID    string        `json:"oid"`
	Name        string        `json:"name"`
	Username    string        `json:"username"`
	ClientID    string        `json:"client_id"`
	Scope       string        `json:"scope"`
	Resource    string        `json:"resource"`
	Entra       *oauth2.Token `json:"entra"`
	EntraExpiry time.Time     `json:"entra_expiry"`
	RefreshGen  uint64        `json:"refresh_gen"`
	RotatedAt   time.Time     `json:"rotated_at"`
	Expires     time.Time     `json:"expires"`
}

// stateEnvelope is the file as written: the sealed state and what is needed
// to open it.
type stateEnvelope struct {
	Format  string `json:"format"`
	Version int    `json:"version"`
	Kid     string `json:"kid"` // names the SESSION_KEY that sealed it
	Nonce   []byte `json:"nonce"`
	Sealed  []byte `json:"sealed"`
}

const stateFormat = "entra-mcp state"

// The parts of the state, sealed apart: each names itself in the seal, so
// that neither file can pass for the other. Version 1 files hold both.
const (
	partBoth     = stateFormat // version 1
	partSessions = stateFormat + " sessions"
	partClients  = stateFormat + " clients"
)

// clientsFile is where the registrations of STATE_FILE path are kept.
func clientsFile(path string) string { return path + ".clients" }

// clientSaveDelay is how long the background saver lets changes to the
// registrations gather before it writes them.
const clientSaveDelay = 2 * time.Second

// stateWriter lets concurrent saves share writes (a group commit): each
// change waits for a write that began after it, and one write covers every
// change made before it began. Under load the file is written about as often
// as a write takes, however many changes arrive.
type stateWriter struct {
	mu      sync.Mutex
	written *sync.Cond // signalled when a write ends
	changes uint64     // changes announced so far
	saved   uint64     // changes covered by the last write
	writing bool
}

// saveState writes the sessions to STATE_FILE, if set, and returns once a write
// that includes the caller's change is on disk. A failed write is logged, not
// returned: the request has already succeeded in memory, and a lagging file
// costs no session (see rotateRefresh). The caller may hold no session's mu:
// the snapshot takes each one.
func (s *server) saveState() {
	if s.cfg.stateFile == "" {
		return
	}
	w := &s.state
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.written == nil {
		w.written = sync.NewCond(&w.mu)
	}
	w.changes++
	mine := w.changes
	for w.saved < mine {
		if w.writing {
			w.written.Wait()
			continue
		}
		w.writing = true
		covered := w.changes // every change announced so far is in the snapshot below
		w.mu.Unlock()
		if err := writeStateFile(s.cfg.stateFile, s.tokens.keys[0], partSessions, savedState{Sessions: s.snapshotSessions()}); err != nil {
			s.log.Error("save state; a restart now would lose recent changes", "path", s.cfg.stateFile, "err", err)
		}
		w.mu.Lock()
		w.writing = false
		w.saved = covered
		w.written.Broadcast()
	}
}

// registrationSaver lets the registrations be written in the background,
// a few seconds after they change (see startSavingClients).
type registrationSaver struct {
	changed chan struct{} // tells the saver
	dirty   atomic.Bool   // the registrations changed since their last write
	writing sync.Mutex    // held while they are written
}

// keepClient keeps a client that completed a sign-in for clientTTL. The
// registrations are written again only when the client's lifetime had worn
// down to half: every refresh need not rewrite them all.
func (s *server) keepClient(c *client) {
	if left, ok := s.clients.touch(c.ID, clientTTL); ok && left < clientTTL/2 {
		s.registrationsChanged()
	}
}

// registrationsChanged notes that the registrations have changed: the
// background saver writes them within seconds (startSavingClients).
func (s *server) registrationsChanged() {
	if s.cfg.stateFile == "" {
		return
	}
	s.saver.dirty.Store(true)
	select {
	case s.saver.changed <- struct{}{}:
	default: // a save is due already
	}
}

// startSavingClients starts the background saver of the registrations, and
// returns the function that stops it, once the last changes are on disk.
func (s *server) startSavingClients(ctx context.Context) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-s.saver.changed:
			case <-ctx.Done():
				return
			}
			select { // let the changes of the next seconds join this one
			case <-time.After(clientSaveDelay):
			case <-ctx.Done():
				return
			}
			s.saveClients()
		}
	}()
	return func() {
		cancel()
		<-done
		s.saveClients() // the last changes, those of requests that finished during shutdown included
	}
}

// saveClients writes the registrations to their file, if they changed since
// the last write. A failed write is logged, returned, and tried again with the
// next.
func (s *server) saveClients() error {
	s.saver.writing.Lock()
	defer s.saver.writing.Unlock()
	if s.cfg.stateFile == "" || !s.saver.dirty.Swap(false) {
		return nil
	}
	var st savedState
	s.clients.each(func(c *client, expires time.Time) {
		st.Clients = append(st.Clients, savedClient{Metadata: c.clientMetadata, ID: c.ID, IssuedAt: c.IssuedAt, SecretHash: []byte(c.secretHash), Expires: expires})
	})
	err := writeStateFile(clientsFile(s.cfg.stateFile), s.tokens.keys[0], partClients, st)
	if err != nil {
		s.saver.dirty.Store(true)
		s.log.Error("save the registrations; a restart now would lose the newest", "path", clientsFile(s.cfg.stateFile), "err", err)
	}
	return err
}

// snapshotSessions copies the live sessions.
func (s *server) snapshotSessions() []savedSession {
	var saved []savedSession
	s.sessions.each(func(sess *session, expires time.Time) {
		if sess.ended.Load() {
			return // a token request racing with endSession may have put it back
		}
		sess.mu.Lock()
		defer sess.mu.Unlock()
		u := sess.user
		saved = append(saved, savedSession{
			ID: sess.id, Subject: sess.subject, TenantID: u.tenantID, ObjectID: u.objectID, Name: u.name, Username: u.username,
			ClientID: sess.clientID, Scope: sess.scope, Resource: sess.resource,
			Entra: sess.entraToken, EntraExpiry: sess.entraExpiry,
			RefreshGen: sess.refreshGen, RotatedAt: sess.rotatedAt, Expires: expires,
		})
	})
	return saved
}

// writeStateFile seals st, one part of the state, with key and replaces the
// file at path with it, atomically.
func writeStateFile(path string, key codecKey, part string, st savedState) error {
	plain, err := json.Marshal(st)
	if err != nil {
		return err
	}
	gcm := newGCM(key)
	nonce := randomBytes(gcm.NonceSize())
	data, err := json.Marshal(stateEnvelope{Format: stateFormat, Version: 2, Kid: key.stateID(), Nonce: nonce,
		Sealed: gcm.Seal(nil, nonce, plain, []byte(part))})
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*") // created 0600
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after the rename, there is nothing left to remove
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	// The rename survives a power cut, not only a crash, once the directory
	// holding it is on disk too.
	if dir, err := os.Open(filepath.Dir(path)); err == nil {
		dir.Sync()
		dir.Close()
	}
	return nil
}

// loadState reads STATE_FILE and its registrations, if set and present, into
// the server. A file that cannot be read, opened or understood stops the
// server with an error that says what to do: it is never silently replaced.
func (s *server) loadState() error {
	path := s.cfg.stateFile
	if path == "" {
		return nil
	}
	removeLeftovers(path)
	removeLeftovers(clientsFile(path))
	st, version, sessionsKey, err := readStateFile(path, s.tokens.keys, partSessions)
	if err != nil {
		return err
	}
	// The registrations are written again at once if they were in a version
	// 1 file, which the next save of the sessions leaves them out of, or
	// sealed with SESSION_KEY_PREVIOUS, which may go before they change.
	resave, clientsPath := version == 1, path
	if version != 1 {
		clientsPath = clientsFile(path)
		clients, clientsVersion, key, err := readStateFile(clientsPath, s.tokens.keys, partClients)
		if err != nil {
			return err
		}
		if version == 0 && clientsVersion == 0 {
			return nil // the first start: the files come with the first saves
		}
		st.Clients, resave = clients.Clients, key > 0
	}

	// What expired while the server was down is left out; nothing else is.
	// The client of a live session is kept, even if its saved lifetime has
	// passed: the save that extended it may have been lost to a crash.
	now := s.now()
	inUse := make(map[string]bool)
	for _, ss := range st.Sessions {
		inUse[ss.ClientID] = inUse[ss.ClientID] || ss.Expires.After(now)
	}
	for _, c := range st.Clients {
		ttl := c.Expires.Sub(now)
		if inUse[c.ID] {
			ttl = max(ttl, clientTTL)
		}
		if ttl <= 0 {
			continue
		}
		if err := checkClientMetadata(&c.Metadata); err != nil { // registered under older, laxer rules
			s.log.Warn("a saved registration breaks today's rules; dropping it", "client_id", c.ID, "err", err)
			continue
		}
		if isDocumentClientID(c.ID) && !s.acceptsSavedDocumentClient(c) {
			s.log.Warn("a saved client of a metadata document is not accepted now; dropping it", "client_id", c.ID)
			continue
		}
		err := s.clients.put(c.ID, &client{clientMetadata: c.Metadata, ID: c.ID, IssuedAt: c.IssuedAt, secretHash: string(c.SecretHash)}, ttl)
		if err != nil {
			return fmt.Errorf("STATE_FILE %s holds more clients than this server keeps: %w", clientsPath, err)
		}
	}
	for _, ss := range st.Sessions {
		if !ss.Expires.After(now) || ss.Entra == nil {
			continue
		}
		err := s.sessions.put(ss.ID, &session{
			id: ss.ID, subject: ss.Subject, clientID: ss.ClientID, scope: ss.Scope, resource: ss.Resource,
			user:       entraUser{tenantID: ss.TenantID, objectID: ss.ObjectID, name: ss.Name, username: ss.Username},
			entraToken: ss.Entra, entraExpiry: ss.EntraExpiry, refreshGen: ss.RefreshGen, rotatedAt: ss.RotatedAt,
		}, ss.Expires.Sub(now))
		if err != nil {
			return fmt.Errorf("STATE_FILE %s holds more sessions than this server keeps: %w", path, err)
		}
	}
	if resave {
		s.saver.dirty.Store(true)
		if err := s.saveClients(); err != nil {
			return fmt.Errorf("STATE_FILE: write the registrations to %s: %w", clientsFile(path), err)
		}
	}
	if version == 1 || sessionsKey > 0 {
		s.saveState() // version 2, and the current key, from now on
	}
	s.log.Info("state loaded", "path", path, "clients", s.clients.len(), "sessions", s.sessions.len())
	return nil
}

// readStateFile reads and opens the file at path, which holds part of the
// state, and returns what it holds, its version (0 if there is no file yet)
// and the index in keys of the key that sealed it. A version 1 file, which
// holds both parts, is read as the sessions' part.
func readStateFile(path string, keys []codecKey, part string) (st savedState, version, key int, err error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return st, 0, 0, nil // the first start: the file comes with the first save
	}
	if err != nil {
		return st, 0, 0, fmt.Errorf("STATE_FILE: %w", err)
	}
	var env stateEnvelope
	if err := json.Unmarshal(data, &env); err != nil || env.Format != stateFormat {
		return st, 0, 0, fmt.Errorf("STATE_FILE %s is not an entra-mcp state file: point STATE_FILE elsewhere, or move the file away", path)
	}
	switch {
	case env.Version == 1 && part == partSessions:
		part = partBoth
	case env.Version != 2:
		return st, 0, 0, fmt.Errorf("STATE_FILE %s has format version %d, which this entra-mcp cannot read", path, env.Version)
	}
	key = slices.IndexFunc(keys, func(k codecKey) bool { return k.stateID() == env.Kid })
	if key < 0 {
		return st, 0, 0, fmt.Errorf("STATE_FILE %s was written with another SESSION_KEY: set that key as SESSION_KEY or SESSION_KEY_PREVIOUS, or move the file away to start afresh (every client then signs in again)", path)
	}
	plain, err := newGCM(keys[key]).Open(nil, env.Nonce, env.Sealed, []byte(part))
	if err != nil || json.Unmarshal(plain, &st) != nil {
		return st, 0, 0, fmt.Errorf("STATE_FILE %s is damaged (it fails its integrity check): restore a copy, or move it away to start afresh", path)
	}
	return st, env.Version, key, nil
}

// removeLeftovers removes the temporary files that a process killed while
// writing path left behind: exactly the names writeStateFile creates (its
// name, ".tmp", and os.CreateTemp's digits), and nothing a glob in the name
// could match.
func removeLeftovers(path string) {
	dir, prefix := filepath.Dir(path), filepath.Base(path)+".tmp"
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if rest, ok := strings.CutPrefix(e.Name(), prefix); ok && rest != "" && strings.Trim(rest, "0123456789") == "" {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

// newGCM returns AES-256-GCM under the state key of k.
func newGCM(k codecKey) cipher.AEAD {
	block, err := aes.NewCipher(k.state)
	if err != nil {
		panic(err) // the key is always 32 bytes
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	return gcm
}

// stateID names the state key of k in the state file, without revealing it.
func (k codecKey) stateID() string {
	sum := sha256.Sum256(k.state)
	return hex.EncodeToString(sum[:4])
}
