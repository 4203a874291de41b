// Command entra-mcp is an MCP server whose users sign in with Microsoft Entra ID
// while the Entra tokens never leave the server.
//
// Towards MCP clients it is an OAuth 2.1 authorization server; towards Entra ID
// it is a confidential client. A client's sign-in goes through these steps,
// numbered the same way in the README, the code and the tests:
//
//  1. Challenge: an MCP request without a token gets 401 and a pointer to the
//     protected-resource metadata (session.go).
//  2. Discovery: the client reads the protected-resource and
//     authorization-server metadata (auth.go).
//  3. Registration: the client registers itself (auth.go), or names the URL
//     of its client metadata document instead.
//  4. Consent: the browser opens /authorize and the user approves this client
//     on our own consent page (auth.go).
//  5. Sign-in: the server sends the browser to Entra ID with its own state,
//     PKCE challenge and nonce (auth.go).
//  6. Callback: Entra ID redirects to /auth/callback; the server redeems the
//     code, keeps the Entra tokens and hands the client an authorization code
//     of its own (auth.go).
//  7. Token: the client redeems that code for the server's session token, an
//     HMAC-signed token that maps to the server-side session (auth.go,
//     session.go).
//  8. Connect: the client starts an MCP session with the session token: an
//     initialize POSTed to /mcp (Streamable HTTP), or GET /sse (HTTP+SSE)
//     (sse.go). A client of MCP 2026-07-28 has no session, and skips this.
//  9. Messages: JSON-RPC requests POSTed to /mcp, answered in the response;
//     or POSTed to /message, answered on the SSE stream (sse.go, mcp.go).
//  10. Tool: getUserDetails calls Microsoft Graph with the session's Entra
//     token, which the server keeps fresh (mcp.go, session.go).
//
// "Session" names three things here. The signed-in session ([session]) is one
// sign-in through one client, holding the Entra tokens; the session token, our
// access token, names it. An MCP session ([mcpSession]) is one client's
// protocol state on one transport, and a signed-in session may hold several:
// its id is the Mcp-Session-Id header on Streamable HTTP, and ?sessionId= in
// the /message URL on HTTP+SSE.
//
// Configuration comes from the environment; see the README.
package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	if err := run(context.Background(), os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "entra-mcp:", err)
		os.Exit(1)
	}
}

// run starts the server and serves until ctx is done or the process receives
// an interrupt, then shuts down gracefully: open streams are closed and
// in-flight requests finish. Tests call it to start the real server in-process.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	if help, err := parseFlags(args, stdout); help || err != nil {
		return err // -h prints the settings and ends here
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil))
	logConfigNotes(logger, cfg)

	// Fetching Entra's discovery document now reports a wrong tenant or
	// authority at start, before any user tries to sign in.
	entra, err := discoverEntra(ctx, cfg, newHTTPClient(), time.Now)
	if err != nil {
		return err
	}
	srv := newServer(cfg, logger, entra, time.Now)
	if err := srv.loadState(); err != nil {
		return err
	}
	stopSaving := srv.startSavingClients(ctx) // registrations are saved in the background...
	defer stopSaving()                        // ...and the last of them before run returns
	httpServer := newHTTPServer(cfg, srv, logger)
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return fmt.Errorf("ADDR %q: %w", cfg.addr, err)
	}
	logger.Info("listening; give your MCP client this URL", "url", cfg.publicURL+"/mcp", "legacy_sse_url", cfg.publicURL+"/sse", "addr", ln.Addr().String())
	ln = limitConnections(ln, cfg.connLimit) // per client address: one cannot take every descriptor
	return serveUntilDone(ctx, httpServer, ln, logger)
}

// newServer returns the server with every endpoint, in flow order. Nothing
// here is behind the bearer check except the MCP endpoints, which check it
// themselves (step 1).
func newServer(cfg config, logger *slog.Logger, entra *entraClient, now func() time.Time) *server {
	s := &server{
		cfg:         cfg,
		log:         logger,
		now:         now,
		entra:       entra,
		tokens:      newSessionCodec(cfg.publicURL, now, cfg.sessionKeys...),
		clients:     newTTLMap[*client](now, maxClients),
		documents:   newDocumentCache(cfg.documentsLoopback, nil, now),
		consents:    newTTLMap[*authRequest](now, maxPending),
		flows:       newTTLMap[*entraFlow](now, maxPending),
		codes:       newTTLMap[*authCode](now, maxPending),
		sessions:    newTTLMap[*session](now, maxSessions),
		mcp:         newTTLMap[*mcpSession](now, maxSessions),
		limiter:     newRateLimiter(now, cfg.rateLimit),
		keepAlive:   15 * time.Second,
		streamStall: 30 * time.Second,
		closing:     make(chan struct{}),
		saver:       registrationSaver{changed: make(chan struct{}, 1)},
	}

	mux := http.NewServeMux()
	// Step 2: discovery (RFC 9728, RFC 8414). Never behind auth.
	mux.HandleFunc("GET /.well-known/oauth-protected-resource", s.handleResourceMetadata(""))
	mux.HandleFunc("GET /.well-known/oauth-protected-resource/sse", s.handleResourceMetadata("/sse"))
	mux.HandleFunc("GET /.well-known/oauth-protected-resource/mcp", s.handleResourceMetadata("/mcp"))
	mux.HandleFunc("GET /.well-known/oauth-authorization-server", s.handleServerMetadata)
	// Step 3: registration (RFC 7591).
	mux.HandleFunc("POST /register", s.limit("register", s.handleRegister))
	// Steps 4 and 5: consent, then off to Entra ID.
	mux.HandleFunc("GET /authorize", s.limit("authorize", s.handleAuthorize))
	mux.Handle("POST /authorize", http.NewCrossOriginProtection().Handler(s.limit("authorize", s.handleConsent)))
	// Step 6: back from Entra ID.
	mux.HandleFunc("GET /auth/callback", s.limit("callback", s.handleCallback))
	// Step 7: our own tokens; and their revocation (RFC 7009).
	mux.HandleFunc("POST /token", s.limit("token", s.handleToken))
	mux.HandleFunc("POST /revoke", s.limit("revoke", s.handleRevoke))
	// Steps 8 to 10: MCP over Streamable HTTP (MCP 2025-03-26 and later)...
	mux.HandleFunc("POST /mcp", s.handleMCPPost)
	mux.HandleFunc("DELETE /mcp", s.handleMCPDelete)
	mux.HandleFunc("/mcp", s.handleMCPOther) // GET and the rest: 405, after auth
	// ... and over HTTP+SSE (MCP 2024-11-05), for older clients.
	mux.HandleFunc("GET /sse", s.handleSSE)
	mux.HandleFunc("POST /message", s.handleMessage)
	s.mux = mux
	return s
}

// server holds the configuration and every piece of state. There is no
// package-level state: tests run many servers side by side.
type server struct {
	cfg    config
	log    *slog.Logger
	now    func() time.Time
	entra  *entraClient
	tokens *sessionCodec
	mux    *http.ServeMux

	clients  *ttlMap[*client]      // step 3: registered clients, by client_id
	consents *ttlMap[*authRequest] // step 4: requests awaiting consent, by consent id
	flows    *ttlMap[*entraFlow]   // step 5: sign-ins in progress at Entra, by our state
	codes    *ttlMap[*authCode]    // step 6: our authorization codes, by hash
	sessions *ttlMap[*session]     // step 7: signed-in sessions, by session id

	mcp         *ttlMap[*mcpSession] // steps 8 and 9: MCP sessions of both transports, by id
	keepAlive   time.Duration        // interval of SSE keep-alive comments
	streamStall time.Duration        // how long an SSE stream may go unread before it is closed
	closing     chan struct{}        // closed when the server shuts down
	closeOnce   sync.Once
	state       stateWriter       // writes of the state file's sessions
	saver       registrationSaver // writes of the registrations, in the background
	userShares  sync.Mutex        // held while a user's share of sign-ins or MCP sessions is counted and taken
	limiter     *rateLimiter      // requests per client IP to the endpoints anyone can call
	documents   *documentCache    // metadata documents of clients that identify by URL (CIMD)
}

// ---------------------------------------------------------------------------
// Behind the lesson: start-up and shutdown helpers, configuration, the
// outbound HTTP client, caps, CORS, JSON responses and rate limits. The
// lesson above relies on what they promise, not on how they work.

// ServeHTTP answers CORS first, so that browser-based clients (MCP Inspector
// in direct mode, web apps) can read every answer, 401s included, then routes.
func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.cors(w, r) {
		return
	}
	s.mux.ServeHTTP(w, r)
}

// limitConnections returns ln holding at most perAddress connections open
// from one client address (see [clientAddress]; the address connected from,
// a proxy's if there is one); past that, a new connection gets 503 and is
// closed at once. 0: no limit.
func limitConnections(ln net.Listener, perAddress int) net.Listener {
	if perAddress == 0 {
		return ln
	}
	return &connLimiter{Listener: ln, perAddress: perAddress, open: make(map[string]int)}
}

type connLimiter struct {
	net.Listener
	perAddress int
	mu         sync.Mutex
	open       map[string]int // connections open, by client address
}

func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		addr := clientAddress(c.RemoteAddr().String())
		l.mu.Lock()
		full := l.open[addr] >= l.perAddress
		if !full {
			l.open[addr]++
		}
		l.mu.Unlock()
		if !full {
			return &countedConn{Conn: c, release: func() { l.release(addr) }}, nil
		}
		c.SetWriteDeadline(time.Now().Add(time.Second))
		io.WriteString(c, "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 10\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		c.Close()
	}
}

func (l *connLimiter) release(addr string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[addr]--; l.open[addr] <= 0 {
		delete(l.open, addr)
	}
}

// countedConn gives its place back when it closes.
type countedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *countedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}

// CloseWrite lets net/http half-close the connection, as it does on a TCP
// connection, before it closes one whose request it refused.
func (c *countedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// parseFlags parses the command line, which takes no flags but -h, which
// prints the settings; help reports that it did.
func parseFlags(args []string, stdout io.Writer) (help bool, err error) {
	flags := flag.NewFlagSet(args[0], flag.ContinueOnError)
	flags.SetOutput(stdout)
	flags.Usage = func() { fmt.Fprint(stdout, usage) }
	err = flags.Parse(args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return true, nil
	}
	return false, err
}

// newHTTPServer returns the http.Server for srv, with its limits, and with
// srv's streams closed at shutdown: Shutdown waits for active connections,
// and open SSE streams never end on their own.
//
// ReadTimeout gives a request, its body included, a minute to arrive: a
// client that trickles a large body, a byte now and then, is cut off rather
// than hold a connection for as long as it likes, and so is one whose body
// the handler left unread (net/http reads what remains). Once the body has
// been read, net/http lifts the deadline as it starts watching for the
// client going away, so a tool call may then take as long as it needs, and
// an SSE stream, which has no body, lives on (TestSlowBodies holds it to
// that).
func newHTTPServer(cfg config, srv *server, logger *slog.Logger) *http.Server {
	httpServer := &http.Server{
		Addr:              cfg.addr,
		Handler:           srv,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       time.Minute,
		MaxHeaderBytes:    64 << 10, // the request line and headers; 431 past it
		IdleTimeout:       2 * time.Minute,
		// No WriteTimeout: it would cut off long-lived SSE streams.
		ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	httpServer.RegisterOnShutdown(srv.closeStreams)
	return httpServer
}

// serveUntilDone serves on ln until ctx is done, then shuts down gracefully:
// open streams are closed, and requests in flight get 10 seconds to finish.
func serveUntilDone(ctx context.Context, httpServer *http.Server, ln net.Listener, logger *slog.Logger) error {
	serveErr := make(chan error, 1)
	go func() { serveErr <- httpServer.Serve(ln) }()
	select {
	case err := <-serveErr:
		return err
	case <-ctx.Done():
	}
	logger.Info("shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := httpServer.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := <-serveErr; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// logConfigNotes logs, once at start, what a setting means for clients, and
// a certificate that will soon stop working.
func logConfigNotes(logger *slog.Logger, cfg config) {
	if c := cfg.certificate; c != nil && time.Until(c.cert.NotAfter) < 30*24*time.Hour {
		logger.Warn("ENTRA_CLIENT_CERTIFICATE expires within 30 days: make a new one, upload it to the app registration, and restart with it", "expires", c.cert.NotAfter.Format(time.DateOnly))
	}
	if cfg.accessTTL < 10*time.Minute {
		logger.Info("ACCESS_TOKEN_TTL is under 10 minutes: clients will refresh often (VS Code refreshes five minutes before expiry)", "access_token_ttl", cfg.accessTTL.String())
	}
}

// config is the validated configuration. It flows from run into the server;
// nothing reads the environment after start.
type config struct {
	tenantID          string
	clientID          string
	clientSecret      string             // one of three credentials: a secret,
	certificate       *clientCertificate // a certificate and its key,
	assertionFile     string             // or a file holding a federated token
	authority         string             // e.g. https://login.microsoftonline.com, no trailing slash
	graphURL          string             // e.g. https://graph.microsoft.com, no trailing slash
	publicURL         string             // origin clients reach us at, no trailing slash
	addr              string
	sessionKeys       [][]byte // SESSION_KEY, then SESSION_KEY_PREVIOUS if set
	accessTTL         time.Duration
	refreshTTL        time.Duration  // refresh tokens, and the sessions they keep alive
	allowedOrigins    []string       // extra browser origins allowed on the MCP endpoints
	stateFile         string         // where clients and sessions survive restarts; "" keeps them in memory
	rateLimit         int            // requests per minute per client IP and endpoint; 0: no limit
	connLimit         int            // connections open at once per client address; 0: no limit
	allowedTenants    []string       // tenants whose users may sign in; empty: the configured one
	trustedProxies    []netip.Prefix // proxies whose X-Forwarded-For names the client address
	documents         bool           // clients may identify by a metadata document's URL (CIMD)
	documentsLoopback bool           // ...served from a loopback address too, for trying it out
}

const usage = `entra-mcp: an MCP server whose users sign in with Microsoft Entra ID.

Usage: go run .   (configured from the environment)

  ENTRA_TENANT_ID      required  tenant id (or organizations / common)
  ENTRA_CLIENT_ID      required  application (client) id of the app registration
  ENTRA_CLIENT_SECRET  client secret value (never logged); or, without a secret:
  ENTRA_CLIENT_CERTIFICATE     PEM file with a certificate and its RSA private key
  ENTRA_CLIENT_ASSERTION_FILE  file holding a federated token (workload identity)
                       (exactly one of these three is required)
  ENTRA_AUTHORITY      default https://login.microsoftonline.com
  GRAPH_URL            default https://graph.microsoft.com
  PUBLIC_URL           default http://localhost:3001 (origin clients reach the server at)
  ADDR                 default localhost:3001 (listen address)
  SESSION_KEY          default random per start (hex or base64, at least 32 bytes)
  SESSION_KEY_PREVIOUS default none (the SESSION_KEY being replaced; its tokens stay valid)
  STATE_FILE           default none (a file where clients and sessions survive restarts;
                       needs SESSION_KEY)
  ACCESS_TOKEN_TTL     default 1h (lifetime of the access tokens this server issues, 1s to 24h)
  REFRESH_TOKEN_TTL    default 336h (14 days; lifetime of refresh tokens and idle sessions)
  ALLOWED_TENANTS      default the tenant of ENTRA_TENANT_ID (tenant ids whose users may
                       sign in, comma-separated, or *; required for organizations/common)
  RATE_LIMIT           default 120 (requests per minute per client IP and endpoint to
                       /register, /authorize, /auth/callback, /token and /revoke;
                       0: no limit)
  CONNECTION_LIMIT     default 256 (connections one client address may hold open at once;
                       behind a proxy, all users share one address; 0: no limit)
  ALLOWED_ORIGINS      default none (comma-separated browser origins allowed on /mcp,
                       /sse and /message, besides PUBLIC_URL's and loopback ones)
  TRUSTED_PROXIES      default none (comma-separated addresses or CIDR ranges of reverse
                       proxies: a request from one of them counts against the client
                       address it names in X-Forwarded-For)
  CLIENT_METADATA_DOCUMENTS       default on (off: clients may not identify by the URL
                       of a metadata document, and register instead; on needs outbound
                       HTTPS to the clients' hosts)
  CLIENT_METADATA_ALLOW_LOOPBACK  default 0 (1: fetch metadata documents from loopback
                       addresses too, for local testing; needs a loopback PUBLIC_URL
                       and ADDR)

See README.md for the walkthrough.
`

// loadConfig reads and validates the configuration. Each error is one line
// that names the variable and says what to do.
func loadConfig(getenv func(string) string) (config, error) {
	env := func(name, def string) string {
		if v := strings.TrimSpace(getenv(name)); v != "" {
			return v
		}
		return def
	}
	cfg := config{
		tenantID:     env("ENTRA_TENANT_ID", ""),
		clientID:     env("ENTRA_CLIENT_ID", ""),
		clientSecret: env("ENTRA_CLIENT_SECRET", ""),
		addr:         env("ADDR", "localhost:3001"),
	}
	var missing []string
	for _, v := range []struct{ name, value string }{
		{"ENTRA_TENANT_ID", cfg.tenantID},
		{"ENTRA_CLIENT_ID", cfg.clientID},
	} {
		if v.value == "" {
			missing = append(missing, v.name)
		}
	}
	if len(missing) > 0 {
		return config{}, fmt.Errorf("%s not set: copy them from your Entra app registration (README, \"Register an app in Entra ID\")", strings.Join(missing, ", "))
	}
	if err := loadCredential(&cfg, env); err != nil {
		return config{}, err
	}
	if strings.ContainsAny(cfg.tenantID, "/?#%") {
		return config{}, fmt.Errorf("ENTRA_TENANT_ID %q is not a tenant id: use the Directory (tenant) ID from the app's Overview page", cfg.tenantID)
	}

	var err error
	if cfg.authority, err = originURL("ENTRA_AUTHORITY", env("ENTRA_AUTHORITY", "https://login.microsoftonline.com")); err != nil {
		return config{}, err
	}
	if cfg.graphURL, err = originURL("GRAPH_URL", env("GRAPH_URL", "https://graph.microsoft.com")); err != nil {
		return config{}, err
	}
	if cfg.publicURL, err = originURL("PUBLIC_URL", env("PUBLIC_URL", "http://localhost:3001")); err != nil {
		return config{}, err
	}
	keySet := env("SESSION_KEY", "") != ""
	key, err := parseSessionKey("SESSION_KEY", env("SESSION_KEY", ""))
	if err != nil {
		return config{}, err
	}
	cfg.sessionKeys = [][]byte{key}
	if cfg.stateFile = env("STATE_FILE", ""); cfg.stateFile != "" && !keySet {
		return config{}, errors.New("STATE_FILE needs SESSION_KEY: with a random key per start, nothing in the file could be read after a restart")
	}
	if previous := env("SESSION_KEY_PREVIOUS", ""); previous != "" {
		old, err := parseSessionKey("SESSION_KEY_PREVIOUS", previous)
		switch {
		case err != nil:
			return config{}, err
		case !keySet:
			return config{}, errors.New("SESSION_KEY_PREVIOUS is set but SESSION_KEY is not: set SESSION_KEY to the new key")
		case bytes.Equal(old, key):
			return config{}, errors.New("SESSION_KEY_PREVIOUS equals SESSION_KEY: set it to the key SESSION_KEY replaces")
		}
		cfg.sessionKeys = append(cfg.sessionKeys, old)
	}
	// Lifetimes as short as a second let a learner watch refreshes happen;
	// below 10 minutes, run logs that clients will refresh often (each
	// refresh is a write of the state file).
	ttl := env("ACCESS_TOKEN_TTL", "1h")
	if cfg.accessTTL, err = time.ParseDuration(ttl); err != nil || cfg.accessTTL < time.Second || cfg.accessTTL > 24*time.Hour {
		return config{}, fmt.Errorf("ACCESS_TOKEN_TTL %q: want a Go duration between 1s and 24h, such as 1h", ttl)
	}
	// Entra's own refresh tokens expire after 90 days of disuse; ours must
	// not outlive the Entra session they stand for.
	rttl := env("REFRESH_TOKEN_TTL", "336h")
	if cfg.refreshTTL, err = time.ParseDuration(rttl); err != nil || cfg.refreshTTL < cfg.accessTTL || cfg.refreshTTL > 90*24*time.Hour {
		return config{}, fmt.Errorf("REFRESH_TOKEN_TTL %q: want a Go duration from ACCESS_TOKEN_TTL up to 2160h (90 days), such as 336h (14 days)", rttl)
	}
	for t := range strings.SplitSeq(env("ALLOWED_TENANTS", ""), ",") {
		t = strings.ToLower(strings.TrimSpace(t)) // tid claims are lower case
		switch {
		case t == "":
		case t != "*" && !isGUID(t):
			return config{}, fmt.Errorf("ALLOWED_TENANTS: %q is not a tenant id: list Directory (tenant) IDs, such as 72f988bf-86f1-41af-91ab-2d7cd011db47, or *", t)
		default:
			cfg.allowedTenants = append(cfg.allowedTenants, t)
		}
	}
	limit := env("RATE_LIMIT", "120")
	if cfg.rateLimit, err = strconv.Atoi(limit); err != nil || cfg.rateLimit < 0 {
		return config{}, fmt.Errorf("RATE_LIMIT %q: want requests per minute per client IP and endpoint, such as 120, or 0 for no limit", limit)
	}
	conns := env("CONNECTION_LIMIT", "256")
	if cfg.connLimit, err = strconv.Atoi(conns); err != nil || cfg.connLimit < 0 {
		return config{}, fmt.Errorf("CONNECTION_LIMIT %q: want how many connections one client address may hold open at once, such as 256, or 0 for no limit", conns)
	}
	for o := range strings.SplitSeq(env("ALLOWED_ORIGINS", ""), ",") {
		if o = strings.TrimSpace(o); o == "" {
			continue
		}
		u, err := url.Parse(o)
		if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") || (u.Path != "" && u.Path != "/") ||
			u.RawQuery != "" || u.Fragment != "" || u.User != nil || strings.Contains(u.Host, "*") {
			return config{}, fmt.Errorf("ALLOWED_ORIGINS: %q is not an origin; list origins such as https://app.example.com, separated by commas", o)
		}
		cfg.allowedOrigins = append(cfg.allowedOrigins, normalOrigin(u))
	}
	for p := range strings.SplitSeq(env("TRUSTED_PROXIES", ""), ",") {
		if p = strings.TrimSpace(p); p == "" {
			continue
		}
		prefix, err := netip.ParsePrefix(p)
		if addr, errAddr := netip.ParseAddr(p); errAddr == nil {
			prefix, err = addr.Prefix(addr.BitLen())
		}
		if err == nil && prefix.Addr().Is4In6() && prefix.Bits() >= 96 {
			prefix = netip.PrefixFrom(prefix.Addr().Unmap(), prefix.Bits()-96) // addresses are compared unmapped
		}
		switch {
		case err != nil:
			return config{}, fmt.Errorf("TRUSTED_PROXIES: %q is not an address or a CIDR range such as 10.0.0.5/32", p)
		case prefix.Bits() == 0:
			return config{}, fmt.Errorf("TRUSTED_PROXIES: %q would trust everyone to name their own address: list your proxies' addresses", p)
		}
		cfg.trustedProxies = append(cfg.trustedProxies, prefix.Masked())
	}
	switch v := env("CLIENT_METADATA_DOCUMENTS", "on"); v {
	case "on", "off":
		cfg.documents = v == "on"
	default:
		return config{}, fmt.Errorf("CLIENT_METADATA_DOCUMENTS %q: want on or off", v)
	}
	switch v := env("CLIENT_METADATA_ALLOW_LOOPBACK", "0"); v {
	case "0", "1":
		cfg.documentsLoopback = v == "1"
	default:
		return config{}, fmt.Errorf("CLIENT_METADATA_ALLOW_LOOPBACK %q: want 1 or 0", v)
	}
	// Fetching from loopback on a server others reach would let anyone make
	// it read the services of its own machine.
	u, _ := url.Parse(cfg.publicURL)
	host, _, _ := net.SplitHostPort(cfg.addr)
	if cfg.documentsLoopback && (!isLoopbackHost(u.Hostname()) || !isLoopbackHost(host)) {
		return config{}, errors.New("CLIENT_METADATA_ALLOW_LOOPBACK=1 is for local testing: it needs a loopback PUBLIC_URL and ADDR, such as http://localhost:3001 and localhost:3001")
	}
	return cfg, nil
}

// loadCredential reads how the server proves itself to Entra ID: exactly one
// of a client secret, a certificate (read and checked now), or a file of
// federated tokens (read now, and again for every token request).
func loadCredential(cfg *config, env func(name, def string) string) error {
	certificate, assertionFile := env("ENTRA_CLIENT_CERTIFICATE", ""), env("ENTRA_CLIENT_ASSERTION_FILE", "")
	var set []string
	for _, v := range []struct{ name, value string }{
		{"ENTRA_CLIENT_ASSERTION_FILE", assertionFile},
		{"ENTRA_CLIENT_CERTIFICATE", certificate},
		{"ENTRA_CLIENT_SECRET", cfg.clientSecret},
	} {
		if v.value != "" {
			set = append(set, v.name)
		}
	}
	switch {
	case len(set) == 0:
		return errors.New("no credential for Entra ID: set one of ENTRA_CLIENT_SECRET, ENTRA_CLIENT_CERTIFICATE or ENTRA_CLIENT_ASSERTION_FILE (README, \"Register an app in Entra ID\")")
	case len(set) > 1:
		return fmt.Errorf("%s are set: set only one credential for Entra ID", strings.Join(set, " and "))
	case certificate != "":
		var err error
		cfg.certificate, err = loadCertificate(certificate, time.Now())
		return err
	case assertionFile != "":
		cfg.assertionFile = assertionFile
		_, err := readAssertionFile(assertionFile)
		return err
	}
	return nil
}

// parseSessionKey decodes SESSION_KEY (or SESSION_KEY_PREVIOUS, as name
// says). An empty value means a random key per start: every token dies with
// the process, which is safe but signs everyone out on restart.
func parseSessionKey(name, s string) ([]byte, error) {
	if s == "" {
		return randomBytes(32), nil
	}
	for _, decode := range []func(string) ([]byte, error){
		hex.DecodeString,
		base64.StdEncoding.DecodeString,
		base64.RawStdEncoding.DecodeString,
		base64.URLEncoding.DecodeString,
		base64.RawURLEncoding.DecodeString,
	} {
		if key, err := decode(s); err == nil && len(key) >= 32 {
			return key, nil
		}
	}
	return nil, errors.New(name + ": want at least 32 random bytes, hex or base64 encoded; generate one with: openssl rand -hex 32")
}

// originURL validates a URL that must be a bare origin (scheme and host, no
// path) and returns it without a trailing slash, so that identifiers built from
// it (the issuer, resource URLs) compare byte for byte. Plain http is allowed
// only for loopback hosts: elsewhere tokens and secrets would cross the network
// in clear text.
func originURL(name, raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return "", fmt.Errorf("%s %q: want an absolute URL such as https://example.com", name, raw)
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return "", fmt.Errorf("%s %q: want an origin only (scheme and host, no path or query)", name, raw)
	}
	if u.Scheme == "http" && !isLoopbackHost(u.Hostname()) {
		return "", fmt.Errorf("%s %q: plain http is allowed only for localhost; use https", name, raw)
	}
	return normalOrigin(u), nil
}

// normalOrigin returns the origin of u as browsers send it in Origin headers
// (RFC 6454 §6.1): lower-case scheme and host, no default port, no slash.
func normalOrigin(u *url.URL) string {
	host := strings.ToLower(u.Host)
	if port := u.Port(); (u.Scheme == "https" && port == "443") || (u.Scheme == "http" && port == "80") {
		host = strings.TrimSuffix(host, ":"+port)
	}
	return strings.ToLower(u.Scheme) + "://" + host
}

// isGUID reports whether s is a GUID such as Entra's tenant ids.
func isGUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range s {
		switch {
		case i == 8 || i == 13 || i == 18 || i == 23:
			if c != '-' {
				return false
			}
		case !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'):
			return false
		}
	}
	return true
}

// isLoopbackHost reports whether host names this machine: localhost or a
// loopback IP (RFC 8252 §7.3).
func isLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// newHTTPClient returns the one client for every call to Entra ID and Graph:
// with a timeout, since the default client would wait for ever on a stuck
// connection, and enough idle connections kept open that concurrent tool
// calls reuse them rather than dial Graph anew each time.
func newHTTPClient() *http.Client {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConnsPerHost = 64
	return &http.Client{Timeout: 30 * time.Second, Transport: transport}
}

// Caps on the state the server keeps (see ttlMap): past them it answers 503,
// but for consents and sign-ins at Entra, where the client address holding
// the most makes room (see ttlMap.putCharged).
const (
	maxClients  = 10_000 // registered clients
	maxPending  = 10_000 // consents, sign-ins at Entra, and codes: each
	maxSessions = 10_000 // signed-in sessions; and MCP sessions
)

// closeStreams ends every open SSE stream; run calls it on shutdown.
func (s *server) closeStreams() { s.closeOnce.Do(func() { close(s.closing) }) }

// writeJSON writes v as a JSON response. Every JSON response of this server
// may carry a token or a secret, or depend on one, so none may be cached
// (RFC 6749 §5.1).
func writeJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(v); err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

// cors adds the CORS headers a browser needs to let a page read the answer,
// and answers preflight requests, before any authentication (Fetch standard,
// "CORS protocol"). Which pages may read what:
//   - the metadata documents, /register, /token and /revoke: any page. They
//     use no cookies, and what they give out needs a code, a verifier or a
//     secret the page must already have;
//   - /mcp, /sse and /message: the pages the Origin check lets through (see
//     mcpRequest), and no others;
//   - /authorize and /auth/callback: none. Browsers reach them by navigating,
//     not by fetching.
//
// It reports whether it has answered the request itself (a preflight).
func (s *server) cors(w http.ResponseWriter, r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return false
	}
	h := w.Header()
	switch p := r.URL.Path; {
	case strings.HasPrefix(p, "/.well-known/") || p == "/register" || p == "/token" || p == "/revoke":
		h.Set("Access-Control-Allow-Origin", "*")
	case p == "/mcp" || p == "/sse" || p == "/message":
		h.Add("Vary", "Origin") // the answer depends on it: caches must not mix pages up
		if !s.originAllowed(origin) {
			return false
		}
		h.Set("Access-Control-Allow-Origin", origin)
	default:
		return false
	}
	h.Set("Access-Control-Expose-Headers", "WWW-Authenticate, Mcp-Session-Id, Mcp-Protocol-Version, Retry-After")
	if r.Method != http.MethodOptions || r.Header.Get("Access-Control-Request-Method") == "" {
		return false
	}
	h.Set("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
	h.Set("Access-Control-Allow-Headers", "Authorization, Content-Type, Accept, Mcp-Session-Id, Mcp-Protocol-Version, Last-Event-ID, Mcp-Method, Mcp-Name")
	h.Set("Access-Control-Max-Age", "86400")
	w.WriteHeader(http.StatusNoContent)
	return true
}

// checkMemberNames refuses JSON that a lenient reader could read otherwise
// than encoding/json does: a member name given twice in one object, at any
// depth (encoding/json keeps the last, a gateway filtering requests may read
// the first), and, in the objects whose members this server decodes, a name
// that matches one of them only when case is ignored ("Method" for
// "method", which encoding/json would accept). decoded lists those names by
// the object's path: "" for the top level (and each member of a top-level
// array), "params" for the object under the top level's "params".
func checkMemberNames(data []byte, decoded map[string][]string) error {
	type frame struct {
		object bool
		path   string
		seen   map[string]bool
		key    string // the last member name: its value comes next, if value
		value  bool
	}
	var stack []*frame
	valuePath := func() string { // the path of the value about to start
		if len(stack) == 0 {
			return ""
		}
		top := stack[len(stack)-1]
		if !top.object {
			return top.path
		}
		return strings.TrimPrefix(top.path+"."+top.key, ".")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if name, ok := tok.(string); ok && len(stack) > 0 && stack[len(stack)-1].object && !stack[len(stack)-1].value {
			top := stack[len(stack)-1]
			if top.seen[name] {
				return fmt.Errorf("the member %q appears twice", name)
			}
			top.seen[name] = true
			for _, want := range decoded[top.path] {
				if name != want && strings.EqualFold(name, want) {
					return fmt.Errorf("the member %q must be spelled %q", name, want)
				}
			}
			top.key, top.value = name, true
			continue
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			stack = append(stack, &frame{object: tok == json.Delim('{'), path: valuePath(), seen: map[string]bool{}})
			continue
		case json.Delim('}'), json.Delim(']'):
			stack = stack[:len(stack)-1]
		}
		if len(stack) > 0 { // a value has ended: in an object, a name comes next
			stack[len(stack)-1].value = false
		}
	}
}

// limit wraps the handler of an endpoint anyone can call with the rate limit
// of its client's IP address, so that a loop cannot fill the stores behind it
// or flood Entra with sign-ins. Past the limit: 429 with Retry-After, and an
// OAuth JSON error (a page at /authorize and /auth/callback, which browsers
// show).
func (s *server) limit(endpoint string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if wait, ok := s.limiter.allow(endpoint + " " + s.clientAddressOf(r)); !ok {
			w.Header().Set("Retry-After", strconv.Itoa(int(wait/time.Second)+1))
			if endpoint == "authorize" || endpoint == "callback" { // browsers: a page
				s.errorPage(w, http.StatusTooManyRequests, "Too many requests", "Too many sign-in attempts from your address. Wait a minute, then try again.")
				return
			}
			writeJSON(w, http.StatusTooManyRequests, &oauthError{Code: "temporarily_unavailable", Description: "too many requests from your address; try again in a minute"})
			return
		}
		h(w, r)
	}
}

// clientAddressOf returns the client address of r that limits and quotas
// count (see [clientAddress]): the address r came from, unless that is one
// of TRUSTED_PROXIES, which forward for others. Then it is the address the
// proxies name in X-Forwarded-For: the last one there that is not itself a
// trusted proxy, since each proxy appends the address it got the request
// from, and anything before is whatever the client chose to send.
func (s *server) clientAddressOf(r *http.Request) string {
	peer, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil || !s.trustedProxy(peer.Addr()) {
		return clientAddress(r.RemoteAddr)
	}
	hops := strings.Split(strings.Join(r.Header.Values("X-Forwarded-For"), ","), ",")
	for i := len(hops) - 1; i >= 0; i-- {
		hop := strings.TrimSpace(hops[i])
		if hop == "" {
			continue
		}
		addr, err := netip.ParseAddr(strings.Trim(hop, "[]"))
		if ap, errPort := netip.ParseAddrPort(hop); err != nil && errPort == nil {
			addr, err = ap.Addr(), nil // some proxies (Azure Application Gateway) add the port
		}
		if err != nil {
			break // not an address: nothing before it can be trusted either
		}
		if !s.trustedProxy(addr) {
			return clientAddress(netip.AddrPortFrom(addr, 0).String())
		}
	}
	return clientAddress(r.RemoteAddr)
}

// trustedProxy reports whether addr is one of TRUSTED_PROXIES.
func (s *server) trustedProxy(addr netip.Addr) bool {
	addr = addr.Unmap().WithZone("")
	for _, p := range s.cfg.trustedProxies {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// clientAddress is the address a limit counts: the client's IPv4 address, or
// its IPv6 /64, which one user or machine usually holds whole; all loopback
// addresses are one.
func clientAddress(remoteAddr string) string {
	ap, err := netip.ParseAddrPort(remoteAddr)
	if err != nil {
		return remoteAddr
	}
	addr := ap.Addr().Unmap().WithZone("")
	if addr.IsLoopback() {
		return "loopback" // 127.0.0.0/8 and ::1: one machine, this one
	}
	if addr.Is6() {
		prefix, _ := addr.Prefix(64)
		return prefix.String()
	}
	return addr.String()
}

// rateLimiter keeps a token bucket per key (endpoint and client IP): each
// holds up to perMinute tokens, refills at perMinute a minute, and a request
// takes one. A client gets a burst of perMinute requests, then perMinute a
// minute: ample for a person, or an automated test that signs in a few dozen
// times a minute, and a brake on loops. Behind a proxy every client shares
// the proxy's address: raise RATE_LIMIT there.
type rateLimiter struct {
	mu        sync.Mutex
	now       func() time.Time
	perMinute float64 // 0: no limit
	buckets   map[string]*bucket
	lastSweep time.Time
}

type bucket struct {
	tokens float64
	at     time.Time // when tokens was counted
}

// maxBuckets bounds the limiter's memory. When it is reached, full buckets
// are dropped (they are the same as none), at most once a second; if it is
// still reached, new addresses share one bucket, so that many addresses
// together get no more than one.
const maxBuckets = 10_000

func newRateLimiter(now func() time.Time, perMinute int) *rateLimiter {
	return &rateLimiter{now: now, perMinute: float64(perMinute), buckets: make(map[string]*bucket)}
}

// allow takes a token from key's bucket, or says how long until there is one.
func (l *rateLimiter) allow(key string) (time.Duration, bool) {
	if l.perMinute == 0 {
		return 0, true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	refill := func(b *bucket) {
		b.tokens = min(l.perMinute, b.tokens+now.Sub(b.at).Minutes()*l.perMinute)
		b.at = now
	}
	b, ok := l.buckets[key]
	if !ok {
		if len(l.buckets) >= maxBuckets && now.Sub(l.lastSweep) >= time.Second {
			l.lastSweep = now
			for k, b := range l.buckets {
				if refill(b); b.tokens == l.perMinute {
					delete(l.buckets, k)
				}
			}
		}
		if len(l.buckets) >= maxBuckets {
			key = "overflow"
		}
		if b, ok = l.buckets[key]; !ok {
			b = &bucket{tokens: l.perMinute, at: now}
			l.buckets[key] = b
		}
	}
	refill(b)
	if b.tokens < 1 {
		return time.Duration((1 - b.tokens) / l.perMinute * float64(time.Minute)), false
	}
	b.tokens--
	return 0, true
}
