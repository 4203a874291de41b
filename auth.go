package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"html/template"
	"io"
	"math/big"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/oauth2"
)

// Steps 2 to 7: the OAuth 2.1 authorization server MCP clients see, and the
// confidential client of Entra ID behind it. The user approves the client on
// our own consent page (step 4) before the browser goes to Entra ID (step 5);
// the client gets a code of our own (step 6), never one of Entra's.
//
// Specs: OAuth 2.1 (draft-ietf-oauth-v2-1), RFC 6749, RFC 7636 (PKCE),
// RFC 7591 (registration), RFC 8414 and RFC 9728 (metadata), RFC 7009
// (revocation), MCP 2025-06-18 "Authorization" and its security best practices.

// serverScope is the one scope this server grants, whatever a client asks for.
const serverScope = "mcp"

// entraScopes are what the server asks Entra ID for: an id_token (openid,
// profile), a refresh token (offline_access) and Graph's /me (User.Read).
var entraScopes = []string{"openid", "profile", "offline_access", "User.Read"}

// Step 2: discovery.

// handleResourceMetadata serves the metadata of the resource at path: "" for
// the whole server, or "/sse" or "/mcp". Its "resource" is exactly the URL a
// client connects to: strict clients compare them byte for byte (RFC 9728 §3.3).
func (s *server) handleResourceMetadata(path string) http.HandlerFunc {
	doc := resourceMetadata{
		Resource:               s.cfg.publicURL + path,
		AuthorizationServers:   []string{s.cfg.publicURL},
		ScopesSupported:        []string{serverScope},
		BearerMethodsSupported: []string{"header"},
		ResourceName:           "entra-mcp",
	}
	return func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, doc) }
}

// handleServerMetadata serves RFC 8414 metadata. The issuer is PUBLIC_URL byte
// for byte, as clients check it against the URL they built (§3.3); MCP
// 2025-11-25 clients also check that S256 is listed.
func (s *server) handleServerMetadata(w http.ResponseWriter, r *http.Request) {
	base := s.cfg.publicURL
	writeJSON(w, http.StatusOK, serverMetadata{
		Issuer:                            base,
		AuthorizationEndpoint:             base + "/authorize",
		TokenEndpoint:                     base + "/token",
		RegistrationEndpoint:              base + "/register",
		RevocationEndpoint:                base + "/revoke",
		ResponseTypesSupported:            []string{"code"},
		GrantTypesSupported:               []string{"authorization_code", "refresh_token"},
		CodeChallengeMethodsSupported:     []string{"S256"},
		TokenEndpointAuthMethodsSupported: authMethods,
		RevocationAuthMethodsSupported:    authMethods,
		ScopesSupported:                   []string{serverScope},
		IssParameterSupported:             true, // every redirect to the client carries iss (RFC 9207)
		ClientIDMetadataDocumentSupported: s.cfg.documents,
	})
}

// Step 3: registration.

// handleRegister registers a client (RFC 7591 §3). Registration is open, as MCP
// clients expect; what a client may do is still limited by consent (step 4).
func (s *server) handleRegister(w http.ResponseWriter, r *http.Request) {
	md, err := readClientMetadata(w, r)
	if err != nil {
		writeOAuthError(w, err)
		return
	}
	c := &client{clientMetadata: md, ID: newSecret(), IssuedAt: s.now().Unix()}
	resp := registration{ClientID: c.ID, ClientIDIssuedAt: c.IssuedAt, clientMetadata: md}
	if md.TokenEndpointAuthMethod != "none" {
		secret := newSecret()
		c.secretHash = hashKey(secret)
		resp.ClientSecret = secret
		resp.ClientSecretExpiresAt = new(int64)
	}
	// Kept an hour until it completes a sign-in (then clientTTL), so that a
	// loop of registrations cannot fill the store for long.
	if err := s.clients.put(c.ID, c, unusedClientTTL); err != nil {
		writeOAuthError(w, unavailable())
		return
	}
	s.registrationsChanged() // saved in the background, within seconds
	s.log.Info("client registered", "client_id", c.ID, "client_name", md.ClientName, "auth_method", md.TokenEndpointAuthMethod)
	writeJSON(w, http.StatusCreated, resp)
}

// Step 4: the authorization request and our consent page.

// authRequest is a client's authorization request once validated: what the
// client's flow needs when the user comes back from Entra ID.
type authRequest struct {
	client        *client // as /authorize found it: a metadata document's is kept only once approved
	redirectURI   string
	redirectGiven bool // /authorize named redirect_uri, so /token must repeat it (RFC 6749 §4.1.3)
	state         string
	challenge     string // the client's PKCE S256 challenge
	scope         string
	resource      string // audience of the tokens (RFC 8707)
	browser       string // the browser cookie of whoever opened the consent page
}

// handleAuthorize validates an authorization request (OAuth 2.1 §4.1.1) and
// shows the consent page. Every error here is a page, never a redirect: until
// the user has seen where the client would send them, a redirect could make
// this server an open redirector (RFC 9700 §4.11.2; see [server.authorizeQuery]).
func (s *server) handleAuthorize(w http.ResponseWriter, r *http.Request) {
	q, ok := s.authorizeQuery(w, r)
	if !ok {
		return
	}
	c, ok := s.authorizingClient(w, r, q.Get("client_id")) // registered, or by its metadata document's URL
	if !ok {
		return
	}
	redirectURI, ok := c.matchRedirectURI(q.Get("redirect_uri"))
	if !ok {
		s.errorPage(w, http.StatusBadRequest, "Invalid redirect URI", "The redirect_uri does not match any URI this client registered.")
		return
	}

	req := &authRequest{
		client:        c,
		redirectURI:   redirectURI,
		redirectGiven: q.Has("redirect_uri"),
		state:         q.Get("state"),
		challenge:     q.Get("code_challenge"),
		scope:         serverScope, // absent, empty or foreign scopes all map to ours
		resource:      s.cfg.publicURL,
	}
	if q.Get("response_type") != "code" {
		s.requestErrorPage(w, "unsupported_response_type", "response_type must be code.")
		return
	}
	if q.Get("code_challenge_method") != "S256" || !isPKCEValue(req.challenge) || len(req.challenge) != 43 {
		s.requestErrorPage(w, "invalid_request", "PKCE is required: send a code_challenge with code_challenge_method=S256.")
		return
	}
	if q.Has("resource") {
		resource, ok := s.canonicalResource(q.Get("resource"))
		if !ok {
			s.requestErrorPage(w, "invalid_target", "resource must be this server's URL, its /sse or its /mcp endpoint.")
			return
		}
		req.resource = resource
	}
	req.browser = s.browserCookie(w, r)
	consentID := s.keepConsent(r, req) // charged to the client's address, never refused
	s.showConsent(w, req, consentID)
}

// handleConsent takes the user's decision from the consent page. It is
// wrapped in http.CrossOriginProtection, which rejects cross-origin POSTs; the
// consent id is single-use and bound to the browser that opened the page.
func (s *server) handleConsent(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	if err := r.ParseForm(); err != nil {
		s.errorPage(w, readError(err).status, "Invalid request", "The consent form could not be read.")
		return
	}
	req, ok := s.consents.take(hashKey(r.PostForm.Get("consent_id")))
	if !ok {
		s.errorPage(w, http.StatusBadRequest, "Consent expired", "This consent page has expired or was already used. Start the sign-in again from your MCP client.")
		return
	}
	if !s.sameBrowser(r, req.browser) {
		s.errorPage(w, http.StatusForbidden, "Consent refused", "This consent was not given in the browser that opened the page. Start the sign-in again from your MCP client.")
		return
	}
	switch r.PostForm.Get("decision") {
	case "approve":
		if s.keepDocumentClient(w, req) { // a client known by its metadata document is kept from now on
			s.startSignIn(w, r, req)
		}
	case "deny":
		s.log.Info("consent denied", "client_id", req.client.ID)
		s.redirectError(w, r, req, "access_denied", "the user denied the request")
	default:
		s.errorPage(w, http.StatusBadRequest, "Invalid request", "The consent form carried no decision.")
	}
}

// Step 5: off to Entra ID.

// entraFlow is a sign-in in progress at Entra ID, stored under our state.
type entraFlow struct {
	req      *authRequest
	verifier string // our PKCE verifier towards Entra (RFC 7636)
	nonce    string // our OIDC nonce, echoed in the id_token (OIDC Core §3.1.2.1)
}

// startSignIn sends the approving browser to Entra ID's authorize endpoint.
// Everything in the URL is ours: our client id, our state, our PKCE challenge
// and nonce, our scopes. The client's state, scope and resource stay here;
// Entra would reject our resource URL anyway (AADSTS9010010).
func (s *server) startSignIn(w http.ResponseWriter, r *http.Request, req *authRequest) {
	state := newSecret()
	flow := &entraFlow{req: req, verifier: oauth2.GenerateVerifier(), nonce: newSecret()}
	s.keepFlow(r, state, flow) // charged to the client's address, never refused
	authURL := s.entra.oauth.AuthCodeURL(state,
		oauth2.S256ChallengeOption(flow.verifier),
		oauth2.SetAuthURLParam("nonce", flow.nonce),
		oauth2.SetAuthURLParam("prompt", "select_account"), // let the user pick the account
	)
	http.Redirect(w, r, authURL, http.StatusSeeOther)
}

// Step 6: back from Entra ID.

// handleCallback is Entra ID's redirect target. It checks our state and the
// browser cookie, redeems Entra's code with our PKCE verifier and client
// secret (or assertion), verifies the id_token, creates the session (holding
// the Entra tokens), and sends the browser back to the client with our own
// code.
func (s *server) handleCallback(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	flow, ok := s.flows.take(hashKey(q.Get("state")))
	if !ok {
		s.errorPage(w, http.StatusBadRequest, "Sign-in expired", "This sign-in is unknown, expired, or already finished. Start again from your MCP client.")
		return
	}
	if !s.sameBrowser(r, flow.req.browser) {
		s.log.Warn("callback from another browser than the one that approved", "client_id", flow.req.client.ID)
		s.errorPage(w, http.StatusForbidden, "Sign-in refused", "This sign-in was started in another browser. Start again from your MCP client, in this browser.")
		return
	}
	req := flow.req
	if code := q.Get("error"); code != "" {
		s.redirectEntraError(w, r, req, code, q.Get("error_description"))
		return
	}
	tok, user, err := s.entra.redeem(r.Context(), q.Get("code"), flow, s.now())
	if err != nil {
		s.redirectRedeemError(w, r, req, err)
		return
	}

	sess := &session{
		id:       newSecret(),
		subject:  s.tokens.subject(user),
		user:     user,
		clientID: req.client.ID,
		scope:    req.scope,
		resource: req.resource,
	}
	s.setEntraToken(sess, tok)
	code := newSecret()
	if err := s.codes.put(hashKey(code), &authCode{req: req, session: sess}, codeTTL); err != nil {
		s.redirectError(w, r, req, "temporarily_unavailable", "the server is busy; try again in a minute")
		return
	}
	s.log.Info("signed in", "client_id", req.client.ID, "subject", sess.subject)
	s.redirectToClient(w, r, req, url.Values{"code": {code}})
}

// redeem exchanges Entra's authorization code for Entra's tokens, sending our
// PKCE verifier and client secret (or client assertion), and verifies the
// id_token that comes with them.
func (e *entraClient) redeem(ctx context.Context, code string, flow *entraFlow, now time.Time) (*oauth2.Token, entraUser, error) {
	if code == "" {
		return nil, entraUser{}, errors.New("no code in the redirect from Entra ID")
	}
	ctx = context.WithValue(ctx, oauth2.HTTPClient, e.tokenHTTP)
	tok, err := e.oauth.Exchange(ctx, code, oauth2.VerifierOption(flow.verifier))
	if err != nil {
		return nil, entraUser{}, fmt.Errorf("redeem code: %w", err)
	}
	idToken, _ := tok.Extra("id_token").(string)
	user, err := e.checkIDToken(idToken, flow.nonce, now)
	if err != nil {
		return nil, entraUser{}, fmt.Errorf("id_token: %w", err)
	}
	if !slices.Contains(e.allowedTenants, "*") && !slices.Contains(e.allowedTenants, user.tenantID) {
		return nil, entraUser{}, fmt.Errorf("%w: tenant %s", errTenantNotAllowed, user.tenantID)
	}
	return tok, user, nil
}

// Step 7: the token endpoint.

// handleToken is the token endpoint (OAuth 2.1 §3.2): it authenticates the
// client, then redeems a code (§4.1.3) or a refresh token (§4.3). Errors are
// RFC 6749 §5.2 JSON.
func (s *server) handleToken(w http.ResponseWriter, r *http.Request) {
	c, ok := s.authenticatedClient(w, r) // reads the form, and checks who sent it
	if !ok {
		return
	}
	var resp *tokenResponse
	var err error
	switch grant := r.PostForm.Get("grant_type"); grant {
	case "authorization_code":
		resp, err = s.redeemCode(c, r.PostForm)
	case "refresh_token":
		resp, err = s.redeemRefreshToken(c, r.PostForm)
	case "":
		err = badRequest("invalid_request", "grant_type is missing")
	default:
		err = badRequest("unsupported_grant_type", "grant_type must be authorization_code or refresh_token")
	}
	if err != nil {
		writeOAuthError(w, err)
		return
	}
	w.Header().Set("Pragma", "no-cache")
	writeJSON(w, http.StatusOK, resp)
}

// redeemCode is the authorization_code grant: the code must be ours, unused,
// unexpired, issued to this client for this redirect URI, and the PKCE
// verifier must match the challenge the client sent to /authorize.
func (s *server) redeemCode(c *client, form url.Values) (*tokenResponse, error) {
	code, ok := s.codes.get(hashKey(form.Get("code")))
	if !ok {
		return nil, badRequest("invalid_grant", "the code is invalid or expired")
	}
	// Another client presenting the code learns nothing and changes nothing.
	req := code.req
	if req.client.ID != c.ID {
		return nil, badRequest("invalid_grant", "the code is invalid or expired")
	}
	// A code without its verifier is worth nothing: it neither uses up the
	// code nor spoils the sign-in.
	if got := form.Get("redirect_uri"); (req.redirectGiven || got != "") && got != req.redirectURI {
		return nil, badRequest("invalid_grant", "redirect_uri does not match the authorization request")
	}
	verifier := form.Get("code_verifier")
	if !isPKCEValue(verifier) || !sameSecret(s256(verifier), req.challenge) {
		return nil, badRequest("invalid_grant", "code_verifier does not match the code_challenge")
	}
	aud, err := s.tokenAudience(form, req.resource)
	if err != nil {
		return nil, err
	}
	// Each code works once. A second good use means it leaked with its
	// verifier: end the session the first use started (OAuth 2.1 §4.1.3).
	if code.redeemed.Swap(true) {
		s.log.Warn("authorization code used twice; ending its session", "client_id", c.ID)
		s.endSession(code.session)
		return nil, badRequest("invalid_grant", "the code was already used")
	}
	resp, err := s.startSession(c, code.session, aud)
	if err != nil {
		code.redeemed.Store(false) // the server was full: the client may try again
		return nil, unavailable()
	}
	s.keepClient(c) // a client that completed a sign-in is kept
	s.saveState()
	return resp, nil
}

// ---------------------------------------------------------------------------
// Behind the lesson: the refresh grant and revocation; registration rules,
// redirect URIs, the browser cookie, client authentication, pending requests
// charged per address, clients known by a metadata document, Entra discovery,
// its signing keys and the credentials towards it, the id_token checks, Entra
// error hints, and the error responses and pages.

// client is a registered client, or one known by its metadata document.
type client struct {
	clientMetadata
	ID         string
	IssuedAt   int64
	secretHash string // hashKey of the client secret; empty for public clients
}

// authCode is one of our authorization codes. It carries the session created
// at the callback; the session only goes live when the code is redeemed.
type authCode struct {
	req      *authRequest
	session  *session
	redeemed atomic.Bool
}

// redeemRefreshToken is the refresh_token grant (OAuth 2.1 §4.3): a refresh
// token of this client's live session, rotated by [server.rotateRefresh].
// Another client presenting it changes nothing.
func (s *server) redeemRefreshToken(c *client, form url.Values) (*tokenResponse, error) {
	sid, gen, ok := s.tokens.parseRefreshToken(form.Get("refresh_token"))
	if !ok {
		return nil, badRequest("invalid_grant", "the refresh token is invalid")
	}
	sess, ok := s.sessions.get(sid)
	if !ok || sess.ended.Load() || sess.clientID != c.ID || !c.allows("refresh_token") {
		return nil, badRequest("invalid_grant", "the refresh token is invalid or its session has ended; sign in again")
	}
	aud, err := s.tokenAudience(form, sess.resource)
	if err != nil {
		return nil, err
	}
	// Our session must not outlive the Entra sign-in it stands for: an expired
	// Entra token is renewed now, which fails if the user was signed out
	// there. If Entra cannot be reached, the refresh goes ahead.
	if _, err := s.entraAccessToken(sess, ""); errors.Is(err, errSessionEnded) {
		return nil, badRequest("invalid_grant", errSessionEnded.Error())
	}
	resp, err := s.rotateRefresh(c, sess, gen, aud)
	if errors.Is(err, errStoreFull) {
		return nil, unavailable()
	}
	if err == nil {
		s.log.Info("tokens refreshed", "client_id", c.ID, "subject", sess.subject, "generation", gen+1)
		s.keepClient(c)
		s.saveState() // the new generation must survive a restart
	}
	return resp, err
}

// handleRevoke is the revocation endpoint (RFC 7009). Revoking either token of
// a session ends the whole session. Unknown tokens get 200 too (§2.2), so the
// endpoint says nothing about which tokens exist.
func (s *server) handleRevoke(w http.ResponseWriter, r *http.Request) {
	c, ok := s.authenticatedClient(w, r)
	if !ok {
		return
	}
	token := r.PostForm.Get("token")
	sessionID := ""
	if claims, err := s.tokens.verify(token); err == nil && claims.ClientID == c.ID {
		sessionID = claims.SessionID
	} else if sid, _, ok := s.tokens.parseRefreshToken(token); ok {
		sessionID = sid
	}
	if sess, ok := s.sessions.get(sessionID); ok && sess.clientID == c.ID {
		s.endSession(sess)
	}
	w.WriteHeader(http.StatusOK)
}

// resourceMetadata is the protected-resource metadata of RFC 9728.
type resourceMetadata struct {
	Resource               string   `json:"resource"`
	AuthorizationServers   []string `json:"authorization_servers"`
	ScopesSupported        []string `json:"scopes_supported"`
	BearerMethodsSupported []string `json:"bearer_methods_supported"`
	ResourceName           string   `json:"resource_name"`
}

// serverMetadata is the authorization-server metadata of RFC 8414.
type serverMetadata struct {
	Issuer                            string   `json:"issuer"`
	AuthorizationEndpoint             string   `json:"authorization_endpoint"`
	TokenEndpoint                     string   `json:"token_endpoint"`
	RegistrationEndpoint              string   `json:"registration_endpoint"`
	RevocationEndpoint                string   `json:"revocation_endpoint"`
	ResponseTypesSupported            []string `json:"response_types_supported"`
	GrantTypesSupported               []string `json:"grant_types_supported"`
	CodeChallengeMethodsSupported     []string `json:"code_challenge_methods_supported"`
	TokenEndpointAuthMethodsSupported []string `json:"token_endpoint_auth_methods_supported"`
	RevocationAuthMethodsSupported    []string `json:"revocation_endpoint_auth_methods_supported"`
	ScopesSupported                   []string `json:"scopes_supported"`
	IssParameterSupported             bool     `json:"authorization_response_iss_parameter_supported"`
	ClientIDMetadataDocumentSupported bool     `json:"client_id_metadata_document_supported,omitempty"`
}

// clientMetadata is the part of RFC 7591 §2 client metadata this server
// keeps. Unknown fields are ignored, as §2 requires.
type clientMetadata struct {
	RedirectURIs            []string `json:"redirect_uris"`
	TokenEndpointAuthMethod string   `json:"token_endpoint_auth_method"`
	GrantTypes              []string `json:"grant_types"`
	ResponseTypes           []string `json:"response_types"`
	ClientName              string   `json:"client_name,omitempty"`
	ClientURI               string   `json:"client_uri,omitempty"`
	Scope                   string   `json:"scope"`
	SoftwareID              string   `json:"software_id,omitempty"`
	SoftwareVersion         string   `json:"software_version,omitempty"`
	ApplicationType         string   `json:"application_type,omitempty"` // "native" or "web" (MCP 2026-07-28)
}

// registration is the response of RFC 7591 §3.2.1: the client's id, its
// secret if it has one, and its metadata as registered.
type registration struct {
	ClientID              string `json:"client_id"`
	ClientSecret          string `json:"client_secret,omitempty"`
	ClientIDIssuedAt      int64  `json:"client_id_issued_at"`
	ClientSecretExpiresAt *int64 `json:"client_secret_expires_at,omitempty"` // required with a secret; 0 = never
	clientMetadata
}

// showConsent renders the consent page. The MCP security best practices
// ("Confused Deputy Problem") require it of a proxy like this one: Entra ID
// knows only this server's client id, so its own pages never name the MCP
// client. A user already signed in at Entra only picks an account there
// (prompt=select_account), and a user who consented to this app once is not
// asked again. So the user approves each client here, by name.
func (s *server) showConsent(w http.ResponseWriter, req *authRequest, consentID string) {
	c := req.client
	redirect, _ := url.Parse(req.redirectURI)
	data := struct {
		ClientName, ClientID, RedirectURI, RedirectHost, Scope, ConsentID, ServerHost, DocumentHost string
		Loopback, LocalFromRemote                                                                   bool
	}{
		ServerHost:   strings.TrimPrefix(strings.TrimPrefix(s.cfg.publicURL, "https://"), "http://"),
		ClientName:   c.ClientName,
		ClientID:     c.ID,
		RedirectURI:  req.redirectURI,
		RedirectHost: redirect.Host,
		Scope:        req.scope,
		ConsentID:    consentID,
		Loopback:     isLoopbackHost(redirect.Hostname()),
	}
	if isDocumentClientID(c.ID) {
		// A metadata document's host vouches for the client's name. Its
		// loopback or private-use redirect does not: any program on this
		// computer can listen there, or claim the scheme (MCP 2025-11-25
		// "Client ID Metadata Documents").
		doc, _ := url.Parse(c.ID)
		data.DocumentHost = doc.Host
		onThisComputer := data.Loopback || (redirect.Scheme != "https" && redirect.Scheme != "http")
		data.LocalFromRemote = onThisComputer && !isLoopbackHost(doc.Hostname())
	}
	if redirect.Scheme != "https" && redirect.Scheme != "http" {
		// A private-use scheme names the application, whatever host follows
		// it: com.evil.app://login.microsoftonline.com goes to com.evil.app.
		data.RedirectHost = redirect.Scheme + ":"
		if redirect.Host != "" {
			data.RedirectHost += "//" + redirect.Host
		}
	}
	s.writePage(w, http.StatusOK, consentPage, data)
}

// authMethods are the client authentication methods of RFC 7591 §2 that the
// token and revocation endpoints accept.
var authMethods = []string{"client_secret_basic", "client_secret_post", "none"}

// allows reports whether the client registered for a grant type.
func (c *client) allows(grantType string) bool { return slices.Contains(c.GrantTypes, grantType) }

// readClientMetadata reads a registration request's body: client metadata as
// a JSON object in UTF-8, validated, with defaults filled in, by
// [checkClientMetadata] (no token_endpoint_auth_method: client_secret_basic,
// so the client gets a secret).
func readClientMetadata(w http.ResponseWriter, r *http.Request) (clientMetadata, error) {
	var md clientMetadata
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRegistration))
	if errors.As(err, new(*http.MaxBytesError)) {
		return md, readError(err)
	}
	if err != nil {
		return md, badRequest("invalid_client_metadata", "the body could not be read")
	}
	if !utf8.Valid(body) || json.Unmarshal(body, &md) != nil {
		return md, badRequest("invalid_client_metadata", "the body must be a JSON object of client metadata, in UTF-8")
	}
	if err := checkMemberNames(body, map[string][]string{"": clientMetadataNames}); err != nil {
		return md, badRequest("invalid_client_metadata", err.Error())
	}
	return md, checkClientMetadata(&md)
}

// maxRegistration bounds a registration's body: real clients send well under
// 2 KB, and every registration is kept, in memory and in the state file.
const maxRegistration = 8 << 10

// clientMetadataNames are the member names of [clientMetadata].
var clientMetadataNames = []string{"redirect_uris", "token_endpoint_auth_method", "grant_types", "response_types",
	"client_name", "client_uri", "scope", "software_id", "software_version", "application_type"}

// checkClientMetadata validates md and fills in the defaults this server
// registers (RFC 7591 §2 lets the server replace requested values, as long as
// it returns what it registered).
func checkClientMetadata(md *clientMetadata) error {
	// Lists are kept without repeats: a list of one value a thousand times
	// is a thousand times the memory, for nothing.
	md.RedirectURIs, md.GrantTypes, md.ResponseTypes = withoutRepeats(md.RedirectURIs), withoutRepeats(md.GrantTypes), withoutRepeats(md.ResponseTypes)
	if len(md.RedirectURIs) == 0 || len(md.RedirectURIs) > 10 {
		return badRequest("invalid_redirect_uri", "redirect_uris must list 1 to 10 URIs")
	}
	for _, u := range md.RedirectURIs {
		if err := checkRedirectURI(u); err != nil {
			return badRequest("invalid_redirect_uri", err.Error())
		}
	}
	switch md.TokenEndpointAuthMethod {
	case "":
		md.TokenEndpointAuthMethod = "client_secret_basic" // RFC 7591 §2 default
	case "none", "client_secret_basic", "client_secret_post":
	default:
		return badRequest("invalid_client_metadata", "token_endpoint_auth_method must be none, client_secret_basic or client_secret_post")
	}
	if len(md.GrantTypes) == 0 {
		// Registered for refresh too, so a client that omits grant_types is
		// not sent back to the browser every hour.
		md.GrantTypes = []string{"authorization_code", "refresh_token"}
	}
	for _, g := range md.GrantTypes {
		if g != "authorization_code" && g != "refresh_token" {
			return badRequest("invalid_client_metadata", "grant_types may hold only authorization_code and refresh_token")
		}
	}
	if !slices.Contains(md.GrantTypes, "authorization_code") {
		return badRequest("invalid_client_metadata", "grant_types must include authorization_code")
	}
	if len(md.ResponseTypes) == 0 {
		md.ResponseTypes = []string{"code"}
	}
	if !slices.Equal(md.ResponseTypes, []string{"code"}) {
		return badRequest("invalid_client_metadata", `response_types must be ["code"]`)
	}
	if hasHiddenCharacters(md.ClientName) {
		return badRequest("invalid_client_metadata", "client_name has control or invisible formatting characters")
	}
	if len(md.ClientName) > 200 || len(md.ClientURI) > 2000 || len(md.SoftwareID) > 200 || len(md.SoftwareVersion) > 200 {
		return badRequest("invalid_client_metadata", "a metadata value is too long")
	}
	md.Scope = serverScope // whatever was asked for, this is what there is
	if md.ApplicationType != "native" && md.ApplicationType != "web" {
		md.ApplicationType = "" // accepted, never refused, and not kept (MCP 2026-07-28)
	}
	return nil
}

// withoutRepeats returns list with each value once, in the order first seen.
func withoutRepeats(list []string) []string {
	var out []string
	for _, v := range list {
		if !slices.Contains(out, v) {
			out = append(out, v)
		}
	}
	return out
}

// checkRedirectURI accepts the redirect URIs real MCP clients register: https,
// http on a loopback host (RFC 8252 §7.3), and private-use schemes such as
// cursor:// (RFC 8252 §7.1). Fragments are not allowed (RFC 6749 §3.1.2).
//
// What the consent page shows must be what the browser will do: a host must be
// ASCII (a look-alike such as a Cyrillic "о" in microsoft.com is refused; the
// punycode form is accepted and shown as such), and no control or invisible
// formatting character, bidirectional overrides included, may hide anywhere.
// Single-word schemes are mostly the operating system's own handlers
// (ms-settings:, search-ms:, mailto:...): only those of known MCP clients
// are accepted.
func checkRedirectURI(raw string) error {
	u, err := url.Parse(raw)
	switch {
	case len(raw) > 2000 || err != nil || !u.IsAbs():
		return fmt.Errorf("redirect URI %q is not an absolute URI", raw)
	case u.Fragment != "" || strings.Contains(raw, "#"):
		return fmt.Errorf("redirect URI %q has a fragment", raw)
	case hasHiddenCharacters(raw):
		return fmt.Errorf("redirect URI %q has control or invisible formatting characters", raw)
	case !isASCII(u.Host):
		return fmt.Errorf("redirect URI %q: the host must be ASCII; register its punycode (xn--) form", raw)
	case u.User != nil || strings.Contains(u.Host, "%"):
		return fmt.Errorf("redirect URI %q: user info and %% in the host hide where it leads", raw)
	case u.Scheme == "https":
		if u.Hostname() == "" {
			return fmt.Errorf("redirect URI %q has no host", raw)
		}
	case u.Scheme == "http":
		if !isLoopbackHost(u.Hostname()) {
			return fmt.Errorf("redirect URI %q: plain http is allowed only for localhost, 127.0.0.1 and [::1]", raw)
		}
	case !strings.Contains(u.Scheme, ".") && !slices.Contains(clientSchemes, u.Scheme):
		return fmt.Errorf("redirect URI %q: scheme %s is not allowed; use https, http on localhost, or a private-use scheme such as com.example.app (RFC 8252 §7.1)", raw, u.Scheme)
	}
	return nil
}

// clientSchemes are the single-word private-use schemes of MCP clients in use
// (Cursor registers cursor://anysphere.cursor-mcp/oauth/callback). Other
// private-use schemes must hold a dot, as RFC 8252 §7.1 asks (reverse DNS).
var clientSchemes = []string{"cursor", "vscode", "vscode-insiders", "windsurf"}

// hasHiddenCharacters reports whether s holds a control character or an
// invisible one, which can make text on the consent page read otherwise than
// it is: formatting characters (Unicode category Cf: zero-width characters,
// bidirectional overrides and isolates), line and paragraph separators,
// variation selectors, and the blank fillers of Hangul and Braille.
func hasHiddenCharacters(s string) bool {
	return strings.ContainsFunc(s, func(r rune) bool {
		return unicode.IsControl(r) || unicode.In(r, unicode.Cf, unicode.Zl, unicode.Zp, unicode.Variation_Selector) ||
			slices.Contains([]rune{0x034F, 0x115F, 0x1160, 0x2800, 0x3164, 0xFFA0}, r)
	})
}

func isASCII(s string) bool {
	return !strings.ContainsFunc(s, func(r rune) bool { return r >= utf8.RuneSelf })
}

// matchRedirectURI returns the redirect URI a request may use: the one it
// names, if registered, or the only registered one if it names none
// (RFC 6749 §3.1.2.3). A loopback URI matches on any port, because native
// clients listen wherever a port is free (RFC 8252 §7.3); everything else
// must match exactly.
func (c *client) matchRedirectURI(requested string) (string, bool) {
	if requested == "" {
		if len(c.RedirectURIs) == 1 {
			return c.RedirectURIs[0], true
		}
		return "", false
	}
	if strings.Contains(requested, "#") {
		return "", false // RFC 6749 §3.1.2: never a fragment
	}
	for _, registered := range c.RedirectURIs {
		if requested == registered || sameLoopbackURI(requested, registered) {
			return requested, true
		}
	}
	return "", false
}

// sameLoopbackURI reports whether a and b are the same loopback http URI but
// for the port.
func sameLoopbackURI(a, b string) bool {
	ua, errA := url.Parse(a)
	ub, errB := url.Parse(b)
	if errA != nil || errB != nil || ua.Scheme != "http" || ub.Scheme != "http" || !isLoopbackHost(ua.Hostname()) {
		return false
	}
	return ua.Hostname() == ub.Hostname() && ua.EscapedPath() == ub.EscapedPath() &&
		ua.RawQuery == ub.RawQuery && ua.User == nil && ub.User == nil
}

// authorizeQuery returns the query of an authorization request, or shows an
// error page for one that is too long or repeats a parameter (RFC 6749 §3.1).
//
// Every error at /authorize is shown as a page, never redirected. Before
// client_id and redirect_uri are validated, a redirect would make this server
// an open redirector (OAuth 2.1 §4.1.2.1). After that, it still could:
// registration is open, so a registered redirect URI proves nothing about its
// owner, and an authorization server must not redirect automatically to a URI
// it does not trust (RFC 9700 §4.11.2). Once the user has seen the redirect
// host on the consent page and decided, errors go back to the client as
// RFC 6749 §4.1.2.1 error redirects.
func (s *server) authorizeQuery(w http.ResponseWriter, r *http.Request) (url.Values, bool) {
	if len(r.URL.RawQuery) > maxAuthorizeQuery {
		s.errorPage(w, http.StatusRequestURITooLong, "Invalid request", "The authorization request is too long.")
		return nil, false
	}
	q := r.URL.Query()
	for _, name := range []string{"client_id", "redirect_uri", "response_type", "state", "code_challenge", "code_challenge_method", "scope", "resource"} {
		if len(q[name]) > 1 {
			s.errorPage(w, http.StatusBadRequest, "Invalid request", "The parameter "+name+" appears more than once.")
			return nil, false
		}
	}
	return q, true
}

// pendingPerAddress is how many consents, and as many sign-ins at Entra, one
// client address may have pending: past that, its own oldest makes room.
const pendingPerAddress = 30

// keepConsent stores a validated request under a new consent id, and returns
// the id. It is charged to the client's address (see [ttlMap.putCharged]), so
// that nobody can fill the store for everyone. A browser that starts the
// same client's sign-in again (a reload, a client that retries) replaces its
// earlier consent rather than add one (from the same address: a browser that
// moved leaves its old consent to expire).
func (s *server) keepConsent(r *http.Request, req *authRequest) string {
	address := s.clientAddressOf(r)
	s.consents.deleteCharged(address, func(old *authRequest) bool { return old.browser == req.browser && old.client.ID == req.client.ID })
	consentID := newSecret()
	s.consents.putCharged(address, hashKey(consentID), req, consentTTL, pendingPerAddress)
	return consentID
}

// keepFlow stores a sign-in at Entra under our state, charged to the
// client's address like a consent (see [server.keepConsent]).
func (s *server) keepFlow(r *http.Request, state string, flow *entraFlow) {
	s.flows.putCharged(s.clientAddressOf(r), hashKey(state), flow, flowTTL, pendingPerAddress)
}

// maxAuthorizeQuery bounds an authorization request's query: room for long
// states (VS Code sends a whole URI) and nothing like the megabyte net/http
// would otherwise read.
const maxAuthorizeQuery = 16 << 10

// canonicalResource maps a resource indicator (RFC 8707) to one of the
// resources this server publishes, tolerating case in the scheme and host and
// one trailing slash, as clients send them.
func (s *server) canonicalResource(raw string) (string, bool) {
	u, err := url.Parse(raw)
	if err != nil || u.RawQuery != "" || u.ForceQuery || strings.Contains(raw, "#") || u.User != nil {
		return "", false
	}
	got := strings.ToLower(u.Scheme) + "://" + strings.ToLower(u.Host) + strings.TrimSuffix(u.EscapedPath(), "/")
	for _, path := range []string{"", "/sse", "/mcp"} {
		if got == strings.ToLower(s.cfg.publicURL)+path {
			return s.cfg.publicURL + path, true
		}
	}
	return "", false
}

// tokenAudience returns the audience of the access token a token request
// asks for: the grant's, or the resource the request names, which must be
// the grant's or inside it, an endpoint of a whole-server grant (RFC 8707
// §2.2). The session, and its refresh token, keep the grant's audience.
func (s *server) tokenAudience(form url.Values, granted string) (string, error) {
	if !form.Has("resource") {
		return granted, nil
	}
	if got, ok := s.canonicalResource(form.Get("resource")); ok && (got == granted || granted == s.cfg.publicURL) {
		return got, nil
	}
	return "", badRequest("invalid_target", "resource must be the one the sign-in was for, or inside it")
}

// isPKCEValue reports whether v is 43 to 128 characters of the PKCE alphabet
// (RFC 7636 §4.1).
func isPKCEValue(v string) bool {
	if len(v) < 43 || len(v) > 128 {
		return false
	}
	for _, c := range v {
		if !('A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || strings.ContainsRune("-._~", c)) {
			return false
		}
	}
	return true
}

// browserCookieName names the cookie that ties a consent, and the sign-in
// that follows it, to one browser. Over https it carries the __Host- prefix,
// so that no other site (a sibling subdomain, a network attacker on plain
// http) can plant one of its own choosing (RFC 6265bis §4.1.3.2). Browsers
// have no such protection for http://localhost, where every local service
// shares the cookie jar.
func (s *server) browserCookieName() string {
	if s.secureCookies() {
		return "__Host-entra_mcp_browser"
	}
	return "entra_mcp_browser"
}

func (s *server) secureCookies() bool { return strings.HasPrefix(s.cfg.publicURL, "https://") }

// browserCookie returns this browser's id, setting the cookie if it has none.
//
// The id is checked twice. When the consent form is posted, it proves the
// form was posted by the browser that loaded it (a forged cross-site POST
// carries no SameSite=Lax cookie). At /auth/callback it proves the browser
// coming back from Entra is the one that approved: otherwise an attacker could
// approve consent for his own client and mail the resulting Entra link to a
// victim, whom Entra signs in after no more than an account pick, naming only
// this server's app (GHSA-rww4-4w9c-7733). Lax, not Strict, because the
// callback is a top-level redirect from Entra's site.
func (s *server) browserCookie(w http.ResponseWriter, r *http.Request) string {
	id := ""
	if c, err := r.Cookie(s.browserCookieName()); err == nil && len(c.Value) == len(newSecret()) {
		id = c.Value
	} else {
		id = newSecret()
	}
	http.SetCookie(w, &http.Cookie{
		Name:     s.browserCookieName(),
		Value:    id,
		Path:     "/",
		MaxAge:   int((consentTTL + flowTTL) / time.Second), // outlives the consent page and the sign-in
		HttpOnly: true,
		Secure:   s.secureCookies(),
		SameSite: http.SameSiteLaxMode,
	})
	return id
}

// sameBrowser reports whether r carries the browser cookie id.
func (s *server) sameBrowser(r *http.Request, id string) bool {
	c, err := r.Cookie(s.browserCookieName())
	return err == nil && sameSecret(c.Value, id)
}

// s256 is the PKCE S256 transformation (RFC 7636 §4.2).
func s256(verifier string) string {
	sum := sha256.Sum256([]byte(verifier))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// authenticatedClient reads the form of a token or revocation request and
// authenticates its client; on failure it writes the error and returns false.
func (s *server) authenticatedClient(w http.ResponseWriter, r *http.Request) (*client, bool) {
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		writeOAuthError(w, readError(err))
		return nil, false
	}
	c, err := s.authenticateClient(r)
	if err != nil {
		writeOAuthError(w, err)
		return nil, false
	}
	return c, true
}

// authenticateClient identifies the client of a token or revocation request
// and checks its credentials (RFC 6749 §2.3): a client registered with a
// secret sends it by HTTP Basic (client_secret_basic) or in the form body
// (client_secret_post), whichever it registered, and either is accepted, since
// clients that omit token_endpoint_auth_method at registration often post the
// secret anyway; a public client (none) sends client_id alone, and no secret.
// Failures are 401 invalid_client (RFC 6749 §5.2), which tells MCP clients to
// register again.
func (s *server) authenticateClient(r *http.Request) (*client, error) {
	id, secret, basic := r.BasicAuth()
	if basic {
		// RFC 6749 §2.3.1: the Basic credentials are form-encoded first.
		var errID, errSecret error
		id, errID = url.QueryUnescape(id)
		secret, errSecret = url.QueryUnescape(secret)
		if errID != nil || errSecret != nil {
			return nil, &oauthError{status: http.StatusUnauthorized, Code: "invalid_client", Description: "malformed Basic credentials", basic: true}
		}
		if r.PostForm.Has("client_secret") || (r.PostForm.Has("client_id") && r.PostForm.Get("client_id") != id) {
			return nil, badRequest("invalid_request", "use one client authentication method")
		}
	} else {
		id, secret = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	}
	invalid := &oauthError{status: http.StatusUnauthorized, Code: "invalid_client", Description: "client authentication failed", basic: basic}
	c, ok := s.clients.get(id)
	switch {
	case !ok:
		return nil, invalid
	case c.secretHash == "": // a public client: a secret means confusion, not proof
		if basic || secret != "" {
			return nil, invalid
		}
	case !sameSecret(hashKey(secret), c.secretHash):
		return nil, invalid
	}
	return c, nil
}

// authorizingClient returns the client an authorization request names, or
// shows the error page and returns false. A client_id that is an https URL
// names a client that identifies by a metadata document published there,
// rather than by a registration (CIMD: MCP 2025-11-25 "Client ID Metadata
// Documents", draft-ietf-oauth-client-id-metadata-document). Its document is
// fetched, or taken from [documentCache] while fresh; the client is kept with
// the registrations only once the user approves it (see
// [server.keepDocumentClient]), so that /token, /revoke, refreshes and
// restarts treat it as any other and never fetch.
func (s *server) authorizingClient(w http.ResponseWriter, r *http.Request, id string) (*client, bool) {
	if !isDocumentClientID(id) {
		c, ok := s.clients.get(id)
		if !ok {
			s.errorPage(w, http.StatusBadRequest, "Unknown client", "This application is not registered with this server. Remove the server from your MCP client and add it again.")
		}
		return c, ok
	}
	if !s.cfg.documents {
		s.errorPage(w, http.StatusBadRequest, "Unknown client", "This application identifies itself by a client metadata document, which this server does not accept (CLIENT_METADATA_DOCUMENTS=off). Configure the application to register with the server instead.")
		return nil, false
	}
	c, err := s.documents.client(r.Context(), id, s.clientAddressOf(r))
	var de *documentError
	switch {
	case err == nil:
		return c, true
	case !errors.As(err, &de):
		return nil, false // the browser went away
	}
	host := documentHost(id)
	s.log.Warn("client metadata document refused", "host", host, "reason", de.reason, "err", de.detail)
	switch de.status {
	case http.StatusBadGateway:
		s.errorPage(w, de.status, "Client metadata document unavailable", "This server could not fetch the application's metadata document from "+host+": "+de.reason+
			". Signing in an application that identifies by such a document needs outbound HTTPS from this server to "+host+
			"; if that is not wanted, the server's operator can set CLIENT_METADATA_DOCUMENTS=off, and applications then register instead.")
	case http.StatusServiceUnavailable:
		s.errorPage(w, de.status, "Server busy", "The server is fetching as many client metadata documents as it may at once. Try again in a minute.")
	default:
		s.errorPage(w, de.status, "Invalid client metadata document", "The application's metadata document at "+host+" cannot be used: "+de.reason+".")
	}
	return nil, false
}

// keepDocumentClient keeps the client of a metadata document with the
// registrations, once the user approves it: for at least unusedClientTTL,
// time enough to finish the sign-in, and for as long as a registration once
// it completes one (see [server.keepClient]). It replaces an older copy of
// the document. A client nobody approves is never kept: /authorize alone
// stores nothing.
func (s *server) keepDocumentClient(w http.ResponseWriter, req *authRequest) bool {
	c := req.client
	if !isDocumentClientID(c.ID) {
		return true // a registered client
	}
	if err := s.clients.putAtLeast(c.ID, c, unusedClientTTL); err != nil {
		s.errorPage(w, http.StatusServiceUnavailable, "Server busy", "The server is holding as many clients as it may. Try again later.")
		return false
	}
	s.registrationsChanged() // saved in the background, with whatever else changed
	return true
}

// isDocumentClientID reports whether a client_id names a metadata document:
// registered clients' ids are random, and never a URL.
func isDocumentClientID(id string) bool { return strings.HasPrefix(id, "https://") }

// acceptsSavedDocumentClient reports whether a saved client of a metadata
// document may be loaded under today's settings and rules.
func (s *server) acceptsSavedDocumentClient(c savedClient) bool {
	u, err := url.Parse(c.ID)
	return s.cfg.documents && err == nil && checkDocumentURL(c.ID) == nil && c.SecretHash == nil &&
		c.Metadata.TokenEndpointAuthMethod == "none" && (s.cfg.documentsLoopback || !isLoopbackHost(u.Hostname()))
}

// documentHost returns the host of a metadata document's URL, to show and log.
func documentHost(id string) string {
	if u, err := url.Parse(id); err == nil && u.Host != "" {
		return u.Host
	}
	return "(an invalid URL)"
}

// documentError is why a metadata document cannot be used: the status of the
// error page, what the page says, and for the log, the details. The page
// never repeats what the network or the fetched site said (an address, a
// resolver, a status text of their choosing); the log does.
type documentError struct {
	status int // 400: the URL or the document breaks a rule; 502: no document could be fetched; 503: busy
	reason string
	detail error
}

func (e *documentError) Error() string { return e.reason }

func invalidDocument(reason string) error {
	return &documentError{status: http.StatusBadRequest, reason: reason}
}

func unreachableDocument(reason string, detail error) error {
	return &documentError{status: http.StatusBadGateway, reason: reason, detail: detail}
}

var errDocumentsBusy = &documentError{status: http.StatusServiceUnavailable, reason: "too many metadata documents being fetched"}

// Limits on fetching metadata documents. Anyone can make /authorize fetch a
// URL, so each fetch is small and short, one URL is fetched once however
// many ask for it, one client address has two fetches in flight at most, and
// the server a few: it must not become an amplifier of requests to other
// sites, nor be kept from fetching by one client pointing it at a slow site.
const (
	maxDocumentSize      = 5 << 10         // a document is well under 2 KB
	documentFetchTimeout = 5 * time.Second // for the whole fetch, body included
	maxDocumentFetches   = 8               // fetches in flight at once, server-wide
	fetchesPerAddress    = 2               // ...and from one client address
	maxDocuments         = 1000            // documents and failures cached
	documentTTL          = 5 * time.Minute // a document's lifetime when its answer names none
	minDocumentTTL       = time.Minute     // ...and the bounds of a lifetime it names
	maxDocumentTTL       = 24 * time.Hour  //
	failedDocumentTTL    = time.Minute     // a failure is remembered as long
)

// documentCache fetches client metadata documents and keeps each for as long
// as its answer's Cache-Control max-age says, within bounds.
type documentCache struct {
	httpClient *http.Client
	now        func() time.Time
	fetches    chan struct{} // one slot per fetch in flight
	mu         sync.Mutex
	entries    map[string]*documentEntry // by URL
	byAddress  map[string]int            // fetches in flight, by client address
}

// documentEntry is a document fetched, or being fetched: ready is closed once
// client or err is set.
type documentEntry struct {
	ready   chan struct{}
	client  *client
	err     error
	expires time.Time
}

// newDocumentCache returns the cache, with the HTTP client that fetches
// documents: straight to the document's host (no proxy, so that the address
// check sees the real target), never following a redirect, and refusing to
// connect to any address that is not public (see [publicAddress]); loopback
// ones too, unless loopback is set. roots are the certificate authorities
// trusted, nil for the system's.
func newDocumentCache(loopback bool, roots *x509.CertPool, now func() time.Time) *documentCache {
	dialer := &net.Dialer{
		Timeout: documentFetchTimeout,
		// Control runs once the address is resolved, before connecting: a
		// name that resolves to another address on the next lookup (DNS
		// rebinding) is checked at the address it resolved to this time.
		Control: func(network, address string, _ syscall.RawConn) error {
			ap, err := netip.ParseAddrPort(address)
			if err != nil {
				return fmt.Errorf("refused the address %s", address)
			}
			if ip := ap.Addr(); !publicAddress(ip) && !(loopback && ip.IsLoopback() && !ip.Is4In6()) {
				return fmt.Errorf("refused the address %s, which is not a public one", ip)
			}
			return nil
		},
	}
	transport := &http.Transport{
		Proxy:                  nil,
		DialContext:            dialer.DialContext,
		TLSClientConfig:        &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout:    documentFetchTimeout / 2,
		ResponseHeaderTimeout:  documentFetchTimeout / 2,
		ForceAttemptHTTP2:      true,
		MaxResponseHeaderBytes: 16 << 10,
		MaxIdleConns:           16,
		IdleConnTimeout:        time.Minute,
	}
	return &documentCache{
		httpClient: &http.Client{Transport: transport, CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse // a 3xx is an answer like any other: refused
		}},
		now:       now,
		fetches:   make(chan struct{}, maxDocumentFetches),
		entries:   make(map[string]*documentEntry),
		byAddress: make(map[string]int),
	}
}

// client returns the client the document at id describes: from the cache
// while fresh, else fetched for the client address requester. Requests for a
// URL being fetched wait for that fetch rather than start another.
func (d *documentCache) client(ctx context.Context, id, requester string) (*client, error) {
	if err := checkDocumentURL(id); err != nil {
		return nil, err
	}
	d.mu.Lock()
	e, ok := d.entries[id]
	if ok && e.done() && !d.now().Before(e.expires) {
		ok = false // stale: fetch it again
	}
	if !ok {
		if d.byAddress[requester] >= fetchesPerAddress || !d.makeRoom() {
			d.mu.Unlock()
			return nil, errDocumentsBusy
		}
		d.byAddress[requester]++
		e = &documentEntry{ready: make(chan struct{})}
		d.entries[id] = e
		d.mu.Unlock()
		defer func() {
			d.mu.Lock()
			defer d.mu.Unlock()
			if d.byAddress[requester]--; d.byAddress[requester] == 0 {
				delete(d.byAddress, requester)
			}
		}()
		d.fill(ctx, id, e)
		return e.client, e.err
	}
	d.mu.Unlock()
	select {
	case <-e.ready:
		return e.client, e.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (e *documentEntry) done() bool {
	select {
	case <-e.ready:
		return true
	default:
		return false
	}
}

// makeRoom makes room for one more entry, dropping stale entries, or if there
// are none, one finished entry; false if every entry is a fetch in flight.
// d.mu is held.
func (d *documentCache) makeRoom() bool {
	if len(d.entries) < maxDocuments {
		return true
	}
	for id, e := range d.entries {
		if e.done() && !d.now().Before(e.expires) {
			delete(d.entries, id)
		}
	}
	for id, e := range d.entries {
		if len(d.entries) < maxDocuments {
			break
		}
		if e.done() {
			delete(d.entries, id)
		}
	}
	return len(d.entries) < maxDocuments
}

// fill fetches the document at id into e, within documentFetchTimeout: a
// browser that goes away does not cut short the fetch others wait for.
// First it waits for a free slot, up to documentFetchTimeout and while the
// requester is there; if none comes, it keeps nothing (errDocumentsBusy). A
// failure is kept for failedDocumentTTL, so that a URL that fails is not
// fetched again on every request.
func (d *documentCache) fill(ctx context.Context, id string, e *documentEntry) {
	defer func() {
		if e.client == nil && e.err == nil { // a panic on the way: waiters must not take nil for a client
			e.err = unreachableDocument("the fetch failed", nil)
		}
		close(e.ready)
	}()
	wait, cancelWait := context.WithTimeout(ctx, documentFetchTimeout)
	defer cancelWait()
	select {
	case d.fetches <- struct{}{}:
		defer func() { <-d.fetches }()
	case <-wait.Done():
		e.err = errDocumentsBusy // kept for no time: the next request fetches again
		return
	}
	fetchCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), documentFetchTimeout)
	defer cancel()
	var ttl time.Duration
	e.client, ttl, e.err = d.fetch(fetchCtx, id)
	if e.err != nil {
		ttl = failedDocumentTTL
	}
	e.expires = d.now().Add(ttl)
}

// fetch GETs the document at id and returns its client, and how long it may
// be kept.
func (d *documentCache) fetch(ctx context.Context, id string) (*client, time.Duration, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, id, nil)
	if err != nil {
		return nil, 0, invalidDocument("the client_id is not a URL")
	}
	req.Header.Set("Accept", "application/json")
	resp, err := d.httpClient.Do(req)
	if err != nil {
		return nil, 0, unreachableDocument("the connection failed (the server's log says why)", err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode >= 300 && resp.StatusCode < 400:
		return nil, 0, unreachableDocument(fmt.Sprintf("it answered HTTP %d, and redirects are not followed: the document must be served at the client_id URL itself", resp.StatusCode), nil)
	case resp.StatusCode != http.StatusOK:
		return nil, 0, unreachableDocument(fmt.Sprintf("it answered HTTP %d", resp.StatusCode), nil)
	}
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt != "application/json" && !strings.HasSuffix(mt, "+json") {
		return nil, 0, invalidDocument("it is not served as JSON (application/json)")
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxDocumentSize+1))
	switch {
	case err != nil:
		return nil, 0, unreachableDocument("reading it failed (the server's log says why)", err)
	case len(body) > maxDocumentSize:
		return nil, 0, invalidDocument(fmt.Sprintf("it is larger than %d KB", maxDocumentSize>>10))
	}
	c, err := parseClientDocument(id, body)
	if err != nil {
		return nil, 0, err
	}
	c.IssuedAt = d.now().Unix()
	return c, documentLifetime(resp.Header.Get("Cache-Control")), nil
}

// documentLifetime returns how long a document may be kept: its answer's
// max-age (no-store and no-cache count as 0), within minDocumentTTL and
// maxDocumentTTL, or documentTTL if it says nothing. A document is fetched at
// most once a minute whatever it says: the cache is what keeps /authorize
// from fetching on every request.
func documentLifetime(cacheControl string) time.Duration {
	for directive := range strings.SplitSeq(cacheControl, ",") {
		name, value, _ := strings.Cut(strings.TrimSpace(directive), "=")
		switch name = strings.ToLower(name); {
		case name == "no-store" || name == "no-cache":
			return minDocumentTTL
		case name == "max-age":
			if seconds, err := strconv.Atoi(strings.Trim(value, `"`)); err == nil && seconds >= 0 {
				return min(max(time.Duration(seconds)*time.Second, minDocumentTTL), maxDocumentTTL)
			}
		}
	}
	return documentTTL
}

// checkDocumentURL checks a client_id that is a URL, as the CIMD draft (§3)
// asks: https, a host, a path (not just /), and no fragment, user info or
// dot segments, which would make two strings name one document.
func checkDocumentURL(id string) error {
	u, err := url.Parse(id)
	switch {
	case len(id) > 2000 || err != nil:
		return invalidDocument("the client_id is not a URL")
	case u.Scheme != "https" || u.Host == "" || u.Opaque != "":
		return invalidDocument("the client_id URL must be https, with a host")
	case strings.Contains(id, "#") || u.User != nil:
		return invalidDocument("the client_id URL must have no fragment and no user info")
	case !isASCII(u.Host) || strings.Contains(u.Host, "%") || hasHiddenCharacters(id):
		return invalidDocument("the client_id URL's host must be plain ASCII (its punycode form), with nothing hidden")
	case u.EscapedPath() == "" || u.EscapedPath() == "/":
		return invalidDocument("the client_id URL must have a path, such as /client.json")
	}
	for segment := range strings.SplitSeq(u.EscapedPath(), "/") {
		if s, _ := url.PathUnescape(segment); s == "." || s == ".." {
			return invalidDocument("the client_id URL must have no . or .. segments")
		}
	}
	return nil
}

// parseClientDocument validates a metadata document for the client_id id, by
// the rules of registration (see [checkClientMetadata]), but for its
// defaults and what a document must hold: its client_id is id, byte for
// byte; a client_name, as MCP requires of a document ("Client ID Metadata
// Documents"), cut if long; token_endpoint_auth_method is none, also when
// absent, since anyone can read the document and no secret can be in it.
// The client_id is checked first: until then the JSON may be anybody's, and
// no error quotes it.
func parseClientDocument(id string, body []byte) (*client, error) {
	var doc struct {
		ClientID     *string         `json:"client_id"`
		ClientSecret json.RawMessage `json:"client_secret"`
		clientMetadata
	}
	if !utf8.Valid(body) || json.Unmarshal(body, &doc) != nil {
		return nil, invalidDocument("it is not a JSON object of client metadata, in UTF-8")
	}
	if doc.ClientID == nil || *doc.ClientID != id {
		return nil, invalidDocument("its client_id is not the URL it was fetched from")
	}
	if err := checkMemberNames(body, map[string][]string{"": documentMemberNames}); err != nil {
		return nil, invalidDocument(err.Error())
	}
	md := doc.clientMetadata
	switch {
	case doc.ClientSecret != nil:
		return nil, invalidDocument("it holds a client_secret, which a public document cannot keep secret")
	case md.TokenEndpointAuthMethod == "":
		md.TokenEndpointAuthMethod = "none"
	case md.TokenEndpointAuthMethod != "none":
		return nil, invalidDocument("its token_endpoint_auth_method must be none: this server takes no client secret or key from a document")
	}
	if name := []rune(md.ClientName); len(name) > 80 {
		md.ClientName = string(name[:80]) + "…"
	}
	if err := checkClientMetadata(&md); err != nil {
		return nil, invalidDocument(err.(*oauthError).Description)
	}
	if strings.TrimSpace(md.ClientName) == "" {
		return nil, invalidDocument("it has no client_name")
	}
	return &client{clientMetadata: md, ID: id}, nil
}

// documentMemberNames are the member names of a metadata document this
// server decodes.
var documentMemberNames = append([]string{"client_id", "client_secret"}, clientMetadataNames...)

// publicAddress reports whether ip may be the address of a metadata
// document: an IPv4 address, or an IPv6 one of global unicast (2000::/3),
// outside refusedPrefixes. (netip keeps an IPv4 address and its IPv4-mapped
// IPv6 form apart: the mapped forms fall outside 2000::/3.)
func publicAddress(ip netip.Addr) bool {
	if !ip.IsValid() || ip.Zone() != "" || (ip.Is6() && !globalUnicast.Contains(ip)) {
		return false
	}
	for _, p := range refusedPrefixes {
		if p.Contains(ip) {
			return false
		}
	}
	return true
}

var globalUnicast = netip.MustParsePrefix("2000::/3")

// refusedPrefixes are the addresses no metadata document is fetched from:
// this machine, private and shared networks, link-local addresses (cloud
// metadata services live at 169.254.169.254), multicast, reserved,
// documentation and unspecified ones, and the IPv6 forms that carry an IPv4
// address inside (mapped, compatible, NAT64, 6to4, Teredo), which could
// reach any of those. The IPv6 ones outside 2000::/3 are refused anyway, and
// listed to be read.
var refusedPrefixes = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),       // "this network", 0.0.0.0 included
	netip.MustParsePrefix("10.0.0.0/8"),      // private (RFC 1918)
	netip.MustParsePrefix("100.64.0.0/10"),   // shared address space (carrier NAT)
	netip.MustParsePrefix("127.0.0.0/8"),     // loopback
	netip.MustParsePrefix("169.254.0.0/16"),  // link-local
	netip.MustParsePrefix("172.16.0.0/12"),   // private
	netip.MustParsePrefix("192.0.0.0/24"),    // IETF protocol assignments
	netip.MustParsePrefix("192.0.2.0/24"),    // documentation
	netip.MustParsePrefix("192.88.99.0/24"),  // 6to4 relays
	netip.MustParsePrefix("192.168.0.0/16"),  // private
	netip.MustParsePrefix("198.18.0.0/15"),   // benchmarking
	netip.MustParsePrefix("198.51.100.0/24"), // documentation
	netip.MustParsePrefix("203.0.113.0/24"),  // documentation
	netip.MustParsePrefix("224.0.0.0/4"),     // multicast
	netip.MustParsePrefix("240.0.0.0/4"),     // reserved, and broadcast
	netip.MustParsePrefix("::/96"),           // unspecified, loopback (::1), IPv4-compatible
	netip.MustParsePrefix("::ffff:0:0/96"),   // IPv4-mapped
	netip.MustParsePrefix("64:ff9b::/96"),    // NAT64
	netip.MustParsePrefix("64:ff9b:1::/48"),  // local-use NAT64
	netip.MustParsePrefix("2001::/23"),       // IETF protocol assignments, Teredo (2001::/32) among them
	netip.MustParsePrefix("2001:db8::/32"),   // documentation
	netip.MustParsePrefix("2002::/16"),       // 6to4
	netip.MustParsePrefix("3fff::/20"),       // documentation
	netip.MustParsePrefix("fc00::/7"),        // unique-local
	netip.MustParsePrefix("fe80::/10"),       // link-local
	netip.MustParsePrefix("ff00::/8"),        // multicast
}

// entraClient is this server as a confidential client of Entra ID.
type entraClient struct {
	oauth          *oauth2.Config
	issuer         string   // from Entra's discovery document; may hold "{tenantid}"
	allowedTenants []string // tenants whose users may sign in; "*" for any
	graphURL       string
	httpClient     *http.Client
	tokenHTTP      *http.Client    // for token requests: httpClient, adding a client assertion if there is no secret
	background     context.Context // for token refreshes, which no request may cancel

	jwksURL     string
	fetching    sync.Mutex                // held while the key set is fetched: one fetch at a time
	keysMu      sync.Mutex                // guards keys and keysFetched
	keys        map[string]*rsa.PublicKey // Entra's signing keys, by key id
	keysFetched time.Time                 // when keys were last fetched
}

// discoverEntra fetches Entra's OpenID discovery document, so that a wrong
// tenant or authority stops the server at start, and builds the OAuth client.
// The endpoints come from the configured authority (sovereign clouds, local
// fakes); the discovery document supplies the issuer to check id_tokens
// against.
func discoverEntra(ctx context.Context, cfg config, httpClient *http.Client, now func() time.Time) (*entraClient, error) {
	base := cfg.authority + "/" + url.PathEscape(cfg.tenantID)
	docURL := base + "/v2.0/.well-known/openid-configuration"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, docURL, nil)
	if err != nil {
		return nil, fmt.Errorf("ENTRA_AUTHORITY: %w", err)
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch Entra discovery document %s: %w (check ENTRA_AUTHORITY and the network)", docURL, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("tenant %q unknown to Entra ID (HTTP %d from %s): check ENTRA_TENANT_ID and ENTRA_AUTHORITY", cfg.tenantID, resp.StatusCode, docURL)
	}
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.Unmarshal(body, &doc); err != nil || doc.Issuer == "" || doc.JWKSURI == "" {
		return nil, fmt.Errorf("%s is not an OpenID discovery document: check ENTRA_AUTHORITY", docURL)
	}

	// Who may sign in. With a tenant configured, its users: the discovery
	// document names its id, even if ENTRA_TENANT_ID is a domain name. With
	// organizations or common, any Entra user anywhere could sign in, so
	// ALLOWED_TENANTS must say whom this server is for.
	allowed := cfg.allowedTenants
	if len(allowed) == 0 {
		if strings.Contains(doc.Issuer, "{tenantid}") {
			return nil, fmt.Errorf("ENTRA_TENANT_ID is %q, which lets users of any organization sign in: set ALLOWED_TENANTS to the tenant ids whose users may use this server (or * for all)", cfg.tenantID)
		}
		allowed = []string{path.Base(path.Dir(doc.Issuer))} // https://login.microsoftonline.com/{tid}/v2.0
	}
	keys, err := fetchJWKS(ctx, httpClient, doc.JWKSURI)
	if err != nil {
		return nil, fmt.Errorf("fetch the signing keys of Entra ID (%s): %w", doc.JWKSURI, err)
	}
	tokenHTTP := tokenClient(cfg, httpClient, base+"/oauth2/v2.0/token", now)
	return &entraClient{
		oauth: &oauth2.Config{
			ClientID:     cfg.clientID,
			ClientSecret: cfg.clientSecret,
			Endpoint: oauth2.Endpoint{
				AuthURL:  base + "/oauth2/v2.0/authorize",
				TokenURL: base + "/oauth2/v2.0/token",
				// Entra takes the secret in the body, as Microsoft documents.
				// The default, auto-detection, sends every failing request twice.
				AuthStyle: oauth2.AuthStyleInParams,
			},
			RedirectURL: cfg.publicURL + "/auth/callback",
			Scopes:      entraScopes,
		},
		issuer:         doc.Issuer,
		jwksURL:        doc.JWKSURI,
		keys:           keys,
		keysFetched:    now(),
		allowedTenants: allowed,
		graphURL:       cfg.graphURL,
		httpClient:     httpClient,
		tokenHTTP:      tokenHTTP,
		background:     context.WithValue(context.Background(), oauth2.HTTPClient, tokenHTTP),
	}, nil
}

// Secretless credentials towards Entra ID. Instead of a client secret, each
// token request (code redemption and refresh alike) carries a client
// assertion (RFC 7523 §2.2), a JWT that proves who is asking: one this server
// signs with its certificate's key (ENTRA_CLIENT_CERTIFICATE; Microsoft's
// "certificate credentials"), or one another identity provider issued to
// this workload, which the app trusts through a federated identity
// credential (ENTRA_CLIENT_ASSERTION_FILE; "workload identity federation").

// clientCertificate is ENTRA_CLIENT_CERTIFICATE, read at start.
type clientCertificate struct {
	cert       *x509.Certificate
	key        *rsa.PrivateKey
	thumbprint string // x5t#S256: base64url SHA-256 of the certificate's DER
}

// loadCertificate reads a PEM file holding a certificate and its unencrypted
// RSA private key. Each error is one line that says what to do.
func loadCertificate(path string, now time.Time) (*clientCertificate, error) {
	fail := func(format string, args ...any) (*clientCertificate, error) {
		return nil, fmt.Errorf("ENTRA_CLIENT_CERTIFICATE %q: "+format, append([]any{path}, args...)...)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return fail("%v", errors.Unwrap(err))
	}
	c := &clientCertificate{}
	var certs []*x509.Certificate // the certificate, and maybe its chain, in any order
	var keys []*rsa.PrivateKey
	for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
		switch {
		case block.Type == "CERTIFICATE":
			cert, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return fail("a certificate cannot be read: %v", err)
			}
			certs = append(certs, cert)
		case block.Type == "ENCRYPTED PRIVATE KEY" || block.Headers["Proc-Type"] != "":
			return fail("the private key is encrypted, which Go's standard library cannot read: decrypt it with: openssl pkey -in %s -out key.pem (then put key.pem and the certificate in one file)", path)
		case block.Type == "PRIVATE KEY" || block.Type == "RSA PRIVATE KEY":
			var key any
			if block.Type == "PRIVATE KEY" {
				key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
			} else {
				key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
			}
			rsaKey, ok := key.(*rsa.PrivateKey)
			if err != nil || !ok {
				return fail("the private key is not an RSA key this server can read (Entra ID takes RSA certificates)")
			}
			keys = append(keys, rsaKey)
		}
	}
	for _, key := range keys {
		c.key = key
		for _, cert := range certs {
			if key.PublicKey.Equal(cert.PublicKey) {
				c.cert = cert // the key's own, not one of its chain
			}
		}
		if c.cert != nil {
			break
		}
	}
	switch {
	case len(certs) == 0 && c.key == nil && !bytes.Contains(data, []byte("-----BEGIN")):
		return fail("not a PEM file; a .pfx or .p12 file converts with: openssl pkcs12 -in cert.pfx -out cert.pem -nodes")
	case len(certs) == 0 || c.key == nil:
		return fail("want the certificate and its private key in one PEM file (CERTIFICATE and PRIVATE KEY blocks)")
	case c.key.N.BitLen() < 2048:
		return fail("the RSA key has %d bits; Entra ID wants 2048 or more", c.key.N.BitLen())
	case c.cert == nil:
		return fail("the private key does not belong to the certificate")
	case now.After(c.cert.NotAfter):
		return fail("the certificate expired on %s: make a new one and upload it to the app registration", c.cert.NotAfter.Format(time.DateOnly))
	case now.Before(c.cert.NotBefore):
		return fail("the certificate is valid only from %s", c.cert.NotBefore.Format(time.DateOnly))
	}
	sum := sha256.Sum256(c.cert.Raw)
	c.thumbprint = base64.RawURLEncoding.EncodeToString(sum[:])
	return c, nil
}

// assertion returns a client assertion for the token endpoint tokenURL,
// signed with the certificate's key: PS256 (RSASSA-PSS, SHA-256, a salt as
// long as the hash), with the certificate's thumbprint in the header, and a
// unique jti, so that no two assertions are alike.
func (c *clientCertificate) assertion(clientID, tokenURL string, now time.Time) (string, error) {
	header, _ := json.Marshal(map[string]string{"alg": "PS256", "typ": "JWT", "x5t#S256": c.thumbprint})
	claims, _ := json.Marshal(map[string]any{
		"aud": tokenURL, "iss": clientID, "sub": clientID, "jti": newSecret(),
		"nbf": now.Unix(), "iat": now.Unix(), "exp": now.Add(5 * time.Minute).Unix(),
	})
	signed := base64.RawURLEncoding.EncodeToString(header) + "." + base64.RawURLEncoding.EncodeToString(claims)
	digest := sha256.Sum256([]byte(signed))
	sig, err := rsa.SignPSS(rand.Reader, c.key, crypto.SHA256, digest[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
	if err != nil {
		return "", err
	}
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}

// readAssertionFile returns the token in ENTRA_CLIENT_ASSERTION_FILE. It is
// read for every token request: the platform that writes it (Kubernetes
// workload identity, for one) replaces it before it expires.
func readAssertionFile(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("ENTRA_CLIENT_ASSERTION_FILE %q: %v", path, errors.Unwrap(err))
	}
	if token := strings.TrimSpace(string(data)); token != "" {
		return token, nil
	}
	return "", fmt.Errorf("ENTRA_CLIENT_ASSERTION_FILE %q is empty", path)
}

// tokenClient returns the HTTP client for token requests to Entra ID: base
// itself with a client secret, or base behind an assertionTransport.
func tokenClient(cfg config, base *http.Client, tokenURL string, now func() time.Time) *http.Client {
	var assertion func() (string, error)
	switch {
	case cfg.certificate != nil:
		assertion = func() (string, error) { return cfg.certificate.assertion(cfg.clientID, tokenURL, now()) }
	case cfg.assertionFile != "":
		assertion = func() (string, error) { return readAssertionFile(cfg.assertionFile) }
	default:
		return base
	}
	transport := base.Transport
	if transport == nil {
		transport = http.DefaultTransport
	}
	client := *base
	client.Transport = &assertionTransport{base: transport, tokenURL: tokenURL, assertion: assertion}
	return &client
}

// assertionTransport adds a fresh client assertion to every POST to the token
// endpoint. golang.org/x/oauth2 sends extra parameters when it redeems a
// code, but none when it refreshes a token; here both get one.
type assertionTransport struct {
	base      http.RoundTripper
	tokenURL  string
	assertion func() (string, error)
}

func (t *assertionTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method != http.MethodPost || r.URL.String() != t.tokenURL || r.Body == nil {
		return t.base.RoundTrip(r)
	}
	body, err := io.ReadAll(r.Body)
	r.Body.Close()
	if err != nil {
		return nil, err
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		return nil, err
	}
	assertion, err := t.assertion()
	if err != nil {
		return nil, err
	}
	form.Set("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
	form.Set("client_assertion", assertion)
	encoded := form.Encode()
	r = r.Clone(r.Context())
	r.Body, r.ContentLength = io.NopCloser(strings.NewReader(encoded)), int64(len(encoded))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(encoded)), nil }
	return t.base.RoundTrip(r)
}

// fetchJWKS fetches Entra's signing keys (RFC 7517), by key id.
func fetchJWKS(ctx context.Context, client *http.Client, jwksURL string) (map[string]*rsa.PublicKey, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, jwksURL, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var set struct {
		Keys []struct {
			Kty, Use, Kid, N, E string
		} `json:"keys"`
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&set); err != nil {
		return nil, fmt.Errorf("not a key set: %w", err)
	}
	keys := make(map[string]*rsa.PublicKey)
	for _, k := range set.Keys {
		n, errN := base64.RawURLEncoding.DecodeString(k.N)
		e, errE := base64.RawURLEncoding.DecodeString(k.E)
		if k.Kty != "RSA" || (k.Use != "" && k.Use != "sig") || errN != nil || errE != nil || len(e) > 4 {
			continue
		}
		keys[k.Kid] = &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}
	}
	return keys, nil
}

// signingKey returns Entra's public key kid. Entra rotates its keys, and
// withdraws old ones: the key set is fetched again when a token names a key we
// do not know (at most once a minute, so that a stream of unknown ids cannot
// make us hammer Entra), and once it is a day old. One fetch runs at a time,
// on the background context, so that a browser that gives up does not spoil
// it for the next; lookups of known keys never wait for it. A failed fetch
// keeps the keys we have and does not count against the minute.
func (e *entraClient) signingKey(kid string, now time.Time) (*rsa.PublicKey, error) {
	lookup := func() (key *rsa.PublicKey, known, fresh, recent bool) {
		e.keysMu.Lock()
		defer e.keysMu.Unlock()
		key, known = e.keys[kid]
		age := now.Sub(e.keysFetched)
		return key, known, age < 24*time.Hour, age < time.Minute
	}
	if key, known, fresh, _ := lookup(); known && fresh {
		return key, nil
	}
	e.fetching.Lock()
	defer e.fetching.Unlock()
	key, known, fresh, recent := lookup() // another caller may have fetched meanwhile
	switch {
	case known && fresh:
		return key, nil
	case !known && recent:
		return nil, fmt.Errorf("signed with an unknown key %q", kid)
	}
	keys, err := fetchJWKS(e.background, e.httpClient, e.jwksURL)
	if err != nil {
		if known {
			return key, nil // a day-old key beats none while Entra is unreachable
		}
		return nil, fmt.Errorf("fetch the signing keys of Entra ID: %w", err)
	}
	e.keysMu.Lock()
	e.keys, e.keysFetched = keys, now
	e.keysMu.Unlock()
	if key, ok := keys[kid]; ok {
		return key, nil
	}
	return nil, fmt.Errorf("signed with an unknown key %q", kid)
}

// errTenantNotAllowed reports a user of a tenant outside ALLOWED_TENANTS.
var errTenantNotAllowed = errors.New("the user's tenant is not in ALLOWED_TENANTS")

// idTokenClaims are the id_token claims this server reads (Entra ID v2.0).
type idTokenClaims struct {
	Issuer            string `json:"iss"`
	Audience          string `json:"aud"`
	Expiry            int64  `json:"exp"`
	NotBefore         int64  `json:"nbf"`
	Nonce             string `json:"nonce"`
	TenantID          string `json:"tid"`
	ObjectID          string `json:"oid"`
	Name              string `json:"name"`
	PreferredUsername string `json:"preferred_username"`
}

// clockSkew is how far Entra's clock and ours may disagree.
const clockSkew = 5 * time.Minute

// checkIDToken verifies the id_token (OIDC Core §3.1.3.7): its RS256
// signature by one of Entra's published keys, then the issuer (for
// organizations/common, the template issuer with the token's own tenant), the
// audience, the lifetime and our nonce. The token came straight from Entra's
// token endpoint over TLS, which OIDC Core would accept in place of the
// signature; checking it anyway means a token that did not come from Entra,
// by whatever path, never makes a session (Microsoft: "confidential clients
// should validate ID tokens").
func (e *entraClient) checkIDToken(raw, nonce string, now time.Time) (entraUser, error) {
	parts := strings.Split(raw, ".")
	if len(parts) != 3 {
		return entraUser{}, errors.New("missing or malformed")
	}
	var header struct{ Alg, Kid string }
	if h, err := base64.RawURLEncoding.DecodeString(parts[0]); err != nil || json.Unmarshal(h, &header) != nil {
		return entraUser{}, errors.New("malformed header")
	}
	if header.Alg != "RS256" { // the only algorithm Entra signs id_tokens with
		return entraUser{}, fmt.Errorf("signed with %q, not RS256", header.Alg)
	}
	key, err := e.signingKey(header.Kid, now)
	if err != nil {
		return entraUser{}, err
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	digest := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if err != nil || rsa.VerifyPKCS1v15(key, crypto.SHA256, digest[:], sig) != nil {
		return entraUser{}, errors.New("bad signature")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return entraUser{}, errors.New("malformed payload")
	}
	var c idTokenClaims
	if err := json.Unmarshal(payload, &c); err != nil {
		return entraUser{}, fmt.Errorf("claims: %w", err)
	}
	switch {
	case c.TenantID == "" || c.ObjectID == "":
		return entraUser{}, errors.New("no tid or oid claim (is the openid/profile scope granted?)")
	case c.Issuer != strings.ReplaceAll(e.issuer, "{tenantid}", c.TenantID):
		return entraUser{}, fmt.Errorf("issuer %q is not %q", c.Issuer, e.issuer)
	case c.Audience != e.oauth.ClientID:
		return entraUser{}, errors.New("audience is not ENTRA_CLIENT_ID")
	case !now.Before(time.Unix(c.Expiry, 0).Add(clockSkew)):
		return entraUser{}, errors.New("expired")
	case c.NotBefore != 0 && now.Add(clockSkew).Before(time.Unix(c.NotBefore, 0)):
		return entraUser{}, errors.New("not valid yet")
	case !sameSecret(c.Nonce, nonce):
		return entraUser{}, errors.New("nonce does not match this sign-in")
	}
	return entraUser{tenantID: c.TenantID, objectID: c.ObjectID, name: c.Name, username: c.PreferredUsername}, nil
}

// redirectEntraError passes an error that Entra ID redirected with on to the
// client, as one of the codes of RFC 6749 §4.1.2.1, and logs Entra's codes
// and ids (never its text).
func (s *server) redirectEntraError(w http.ResponseWriter, r *http.Request, req *authRequest, code, description string) {
	s.log.Warn("Entra sign-in failed", append([]any{"client_id", req.client.ID}, entraErrorAttrs(code, description)...)...)
	switch code {
	case "access_denied":
		s.redirectError(w, r, req, "access_denied", "the sign-in with Microsoft Entra ID was cancelled or declined")
	case "temporarily_unavailable":
		s.redirectError(w, r, req, "temporarily_unavailable", "Microsoft Entra ID is temporarily unavailable; try again")
	default:
		s.redirectError(w, r, req, "server_error", "the sign-in with Microsoft Entra ID failed; the server log has details")
	}
}

// redirectRedeemError tells the client that the sign-in could not be
// completed after Entra's redirect: a user of a tenant outside
// ALLOWED_TENANTS, Entra refusing the code, or an id_token that fails its
// checks. The details go to the log.
func (s *server) redirectRedeemError(w http.ResponseWriter, r *http.Request, req *authRequest, err error) {
	if errors.Is(err, errTenantNotAllowed) {
		s.log.Warn("sign-in refused: tenant not allowed", "client_id", req.client.ID, "err", err)
		s.redirectError(w, r, req, "access_denied", "users of your organization may not use this server")
		return
	}
	var rerr *oauth2.RetrieveError
	if errors.As(err, &rerr) {
		s.log.Error("Entra code redemption failed", append([]any{"client_id", req.client.ID}, retrieveErrorAttrs(rerr)...)...)
		if rerr.ErrorCode == "temporarily_unavailable" {
			s.redirectError(w, r, req, "temporarily_unavailable", "Microsoft Entra ID is temporarily unavailable; try again")
			return
		}
	} else {
		s.log.Error("Entra sign-in could not be completed", "client_id", req.client.ID, "err", err)
	}
	s.redirectError(w, r, req, "server_error", "the sign-in with Microsoft Entra ID could not be completed; the server log has details")
}

// entraHints explain the Entra errors that usually mean a setup mistake.
var entraHints = map[string]string{
	"50011":   "the redirect URI is not registered: add PUBLIC_URL/auth/callback as a Web redirect URI of the app registration",
	"7000215": "invalid client secret: ENTRA_CLIENT_SECRET must be the secret's Value, not its Secret ID",
	"7000222": "the client secret has expired: create a new one under Certificates & secrets",
	"65001":   "the app needs consent: grant admin consent for its API permissions, or allow users to consent",
	"700016":  "unknown application: check ENTRA_CLIENT_ID and ENTRA_TENANT_ID",
	"90002":   "unknown tenant: check ENTRA_TENANT_ID",
	"50194":   "the app is single-tenant: set ENTRA_TENANT_ID to its tenant id, not common or organizations",
	"7000218": "no credential reached Entra ID: set ENTRA_CLIENT_SECRET, ENTRA_CLIENT_CERTIFICATE or ENTRA_CLIENT_ASSERTION_FILE",
	"700027":  "the client assertion's signature or certificate was refused: upload the certificate of ENTRA_CLIENT_CERTIFICATE to the app registration (Certificates & secrets), or check the federated token's signer",
	"700024":  "the client assertion is expired or not yet valid: check this machine's clock, and that the platform still renews ENTRA_CLIENT_ASSERTION_FILE",
	"700021":  "the client assertion names another application: ENTRA_CLIENT_ID must be the app that holds the certificate or federated credential",
	"700023":  "the client assertion is for another token endpoint: check ENTRA_TENANT_ID and ENTRA_AUTHORITY",
	"70021":   "no federated credential of the app matches the token in ENTRA_CLIENT_ASSERTION_FILE: check its issuer, subject and audience under Certificates & secrets, Federated credentials",
	"700211":  "no federated credential of the app has the issuer of the token in ENTRA_CLIENT_ASSERTION_FILE",
	"700212":  "the token in ENTRA_CLIENT_ASSERTION_FILE is not for the audience api://AzureADTokenExchange",
	"700213":  "no federated credential of the app has the subject of the token in ENTRA_CLIENT_ASSERTION_FILE",
}

var (
	aadstsPattern      = regexp.MustCompile(`AADSTS(\d+)`)
	traceIDPattern     = regexp.MustCompile(`Trace ID: ([0-9a-fA-F-]+)`)
	correlationPattern = regexp.MustCompile(`Correlation ID: ([0-9a-fA-F-]+)`)
)

// entraErrorAttrs turns an Entra error redirect into log attributes: the
// error, the AADSTS code, Entra's trace and correlation ids (what Microsoft
// support asks for) and a hint. Entra's own text is not logged or passed on.
func entraErrorAttrs(code, description string) []any {
	attrs := []any{"error", code}
	find := func(re *regexp.Regexp) string {
		if m := re.FindStringSubmatch(description); m != nil {
			return m[1]
		}
		return ""
	}
	return appendEntraIDs(attrs, find(aadstsPattern), find(traceIDPattern), find(correlationPattern))
}

// retrieveErrorAttrs does the same for a failed token request, whose JSON body
// carries the codes and ids as fields (Entra ID v2.0 token errors).
func retrieveErrorAttrs(e *oauth2.RetrieveError) []any {
	var body struct {
		ErrorCodes    []int  `json:"error_codes"`
		TraceID       string `json:"trace_id"`
		CorrelationID string `json:"correlation_id"`
	}
	json.Unmarshal(e.Body, &body)
	attrs := []any{"error", e.ErrorCode, "status", e.Response.StatusCode}
	aadsts := ""
	if len(body.ErrorCodes) > 0 {
		aadsts = fmt.Sprint(body.ErrorCodes[0])
	}
	return appendEntraIDs(attrs, aadsts, body.TraceID, body.CorrelationID)
}

func appendEntraIDs(attrs []any, aadsts, traceID, correlationID string) []any {
	if aadsts != "" {
		attrs = append(attrs, "aadsts", aadsts)
		if hint, ok := entraHints[aadsts]; ok {
			attrs = append(attrs, "hint", hint)
		}
	}
	if traceID != "" {
		attrs = append(attrs, "trace_id", traceID)
	}
	if correlationID != "" {
		attrs = append(attrs, "correlation_id", correlationID)
	}
	return attrs
}

// oauthError is an OAuth error response (RFC 6749 §5.2, RFC 7591 §3.2.2).
type oauthError struct {
	status      int
	basic       bool   // the client tried HTTP Basic: answer with a Basic challenge
	Code        string `json:"error"`
	Description string `json:"error_description,omitempty"`
}

func (e *oauthError) Error() string { return e.Code + ": " + e.Description }

// readError is the error for a request body that could not be read: 413
// when it is too large, else 400.
func readError(err error) *oauthError {
	if errors.As(err, new(*http.MaxBytesError)) {
		return &oauthError{status: http.StatusRequestEntityTooLarge, Code: "invalid_request", Description: "the request body is too large"}
	}
	return badRequest("invalid_request", "the body must be application/x-www-form-urlencoded")
}

func badRequest(code, description string) *oauthError {
	return &oauthError{status: http.StatusBadRequest, Code: code, Description: description}
}

// unavailable is the error of a server whose stores are full.
func unavailable() *oauthError {
	return &oauthError{status: http.StatusServiceUnavailable, Code: "temporarily_unavailable", Description: "the server is busy; try again in a minute"}
}

// writeOAuthError writes err as an OAuth JSON error; anything that is not an
// oauthError is a server_error whose details stay out of the response.
func writeOAuthError(w http.ResponseWriter, err error) {
	var e *oauthError
	if !errors.As(err, &e) {
		e = &oauthError{status: http.StatusInternalServerError, Code: "server_error"}
	}
	if e.basic {
		w.Header().Set("WWW-Authenticate", `Basic realm="entra-mcp"`)
	}
	if e.status == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", "60")
	}
	writeJSON(w, e.status, e)
}

// redirectError sends the browser back to the client with an error
// (RFC 6749 §4.1.2.1). Only for validated redirect URIs.
func (s *server) redirectError(w http.ResponseWriter, r *http.Request, req *authRequest, code, description string) {
	s.redirectToClient(w, r, req, url.Values{"error": {code}, "error_description": {description}})
}

// redirectToClient sends the browser to the request's redirect URI with
// params, the client's state, unchanged, and iss, our issuer: a client that
// talks to several authorization servers can tell which one answered, which
// defeats mix-up attacks (RFC 9207). The parameters are added to any query
// the URI has (RFC 6749 §3.1.2), which works for https, loopback and
// private-use schemes alike. After the consent form's POST it is 303 See
// Other, so that the browser follows with a GET.
func (s *server) redirectToClient(w http.ResponseWriter, r *http.Request, req *authRequest, params url.Values) {
	u, _ := url.Parse(req.redirectURI) // validated at registration
	q := u.Query()
	for k, v := range params {
		q[k] = v
	}
	if req.state != "" {
		q.Set("state", req.state)
	}
	q.Set("iss", s.cfg.publicURL)
	u.RawQuery = q.Encode()
	status := http.StatusFound
	if r.Method == http.MethodPost {
		status = http.StatusSeeOther
	}
	w.Header().Set("Cache-Control", "no-store")
	http.Redirect(w, r, u.String(), status)
}

// requestErrorPage shows an invalid authorization request, with its OAuth
// error code for the developer of the client.
func (s *server) requestErrorPage(w http.ResponseWriter, code, message string) {
	s.errorPage(w, http.StatusBadRequest, "Invalid authorization request", "The application sent an invalid request ("+code+"): "+message)
}

// errorPage shows an error to the user in the browser, for errors that must
// not be redirected to the client.
func (s *server) errorPage(w http.ResponseWriter, status int, title, message string) {
	s.writePage(w, status, errorPageTemplate, struct{ Title, Message string }{title, message})
}

// writePage renders an HTML page that no other site may frame
// (clickjacking) and no cache may keep.
func (s *server) writePage(w http.ResponseWriter, status int, t *template.Template, data any) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'")
	h.Set("Referrer-Policy", "no-referrer")
	w.WriteHeader(status)
	if err := t.Execute(w, data); err != nil {
		s.log.Error("render page", "err", err)
	}
}

const pageStyle = `<style>body{font-family:system-ui,sans-serif;max-width:34rem;margin:3rem auto;padding:0 1rem;line-height:1.5}
code{background:#f2f2f2;padding:0 .2rem;word-break:break-all}button{font-size:1rem;padding:.5rem 1.2rem;margin-right:.5rem}</style>`

// consentPage is our consent page: a plain form, no JavaScript. html/template
// escapes every value, client_name included.
var consentPage = template.Must(template.New("consent").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Allow access?</title>` + pageStyle + `</head><body>
<h1>Allow {{if .ClientName}}“{{.ClientName}}”{{else}}an unnamed client{{end}}{{if .DocumentHost}} of {{.DocumentHost}}{{end}} to use the MCP server at {{.ServerHost}}?</h1>
{{if .DocumentHost}}<p>This application is described by <strong>{{.DocumentHost}}</strong>, which published its metadata document at <code>{{.ClientID}}</code>.</p>
{{end}}<p>The application {{if .ClientName}}calling itself <strong>{{.ClientName}}</strong>{{end}} (client id <code>{{.ClientID}}</code>)
wants to use this server's tools as you, with the scope <code>{{.Scope}}</code>.
The tools can read your Microsoft profile (name and email) through Microsoft Graph.</p>
<p>After you sign in with Microsoft, you will be sent to <strong>{{.RedirectHost}}</strong>{{if .Loopback}}, an application on this computer{{end}}:<br><code>{{.RedirectURI}}</code></p>
{{if .LocalFromRemote}}<p><strong>Warning:</strong> {{.DocumentHost}} describes this application, but your sign-in goes to a program on this computer, and any program here could pose as it. Allow only if you are using {{.DocumentHost}}'s application on this computer right now.</p>
{{end}}<p>Only allow this if you started this sign-in yourself, from your MCP client.</p>
<form method="post" action="/authorize">
<input type="hidden" name="consent_id" value="{{.ConsentID}}">
<button type="submit" name="decision" value="approve">Allow</button>
<button type="submit" name="decision" value="deny">Deny</button>
</form></body></html>
`))

var errorPageTemplate = template.Must(template.New("error").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{.Title}}</title>` + pageStyle + `</head><body>
<h1>{{.Title}}</h1><p>{{.Message}}</p></body></html>
`))
