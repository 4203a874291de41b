package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// Steps 9 and 10: the MCP layer, JSON-RPC 2.0 written out by hand, shared by
// both transports (sse.go).
//
// A transport hands a decoded POST body to [server.respond], which dispatches
// each message: initialize, ping, tools/list, tools/call (an MCP 2026-07-28
// request, which has no session, goes to [server.serveModern]). The one tool,
// getUserDetails, calls Microsoft Graph with the Entra token of the caller's
// session (step 10): the request's own token never goes anywhere else (MCP
// 2025-06-18 "Token Passthrough").
//
// Specs: JSON-RPC 2.0; MCP "Lifecycle" and "Tools" (2024-11-05 to 2025-11-25).

// rpcMessage is any JSON-RPC 2.0 message: a request (method and id), a
// notification (method, no id) or a response (result or error, and id).
type rpcMessage struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id,omitempty"`
	Method  string          `json:"method,omitempty"`
	Params  json.RawMessage `json:"params,omitempty"`
	Result  json.RawMessage `json:"result,omitempty"`
	Error   json.RawMessage `json:"error,omitempty"`
}

// rpcResponse is a response: exactly one of Result and Error is set.
type rpcResponse struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"` // null when the request's id is unknown
	Result  any             `json:"result,omitempty"`
	Error   *rpcError       `json:"error,omitempty"`
}

type rpcError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Data    any    `json:"data,omitempty"`
}

// respond dispatches every message of a body for sess in the MCP session ms and
// returns what to answer: nil (only notifications and responses), one
// response, or for a batch an array. A session that ended meanwhile (Entra
// refused to renew it, or it was revoked) gets errSessionEnded, and its
// client 401, to sign in again (MCP 2025-03-26 "Session Binding Requirements").
func (s *server) respond(ctx context.Context, ms *mcpSession, sess *session, b *rpcBody) (any, error) {
	replies := b.invalid
	for _, m := range b.messages {
		if resp := s.dispatch(ctx, ms, sess, m); resp != nil {
			replies = append(replies, resp)
		}
	}
	switch {
	case sess.ended.Load():
		return nil, errSessionEnded
	case len(replies) == 0:
		return nil, nil
	case !b.batch:
		return replies[0], nil
	}
	return replies, nil
}

// dispatch runs one message for sess and returns the response to send, or
// nil: notifications are never answered (JSON-RPC 2.0 §4.1), and responses
// from the client need no answer (this server asks the client nothing).
func (s *server) dispatch(ctx context.Context, ms *mcpSession, sess *session, m *rpcMessage) *rpcResponse {
	if m.Method == "" || m.ID == nil {
		return nil
	}
	result, err := s.call(ctx, ms, sess, m.Method, m.Params)
	if err != nil {
		return &rpcResponse{JSONRPC: "2.0", ID: m.ID, Error: err}
	}
	return &rpcResponse{JSONRPC: "2.0", ID: m.ID, Result: result}
}

// call runs one request: a switch on the method, nothing clever.
func (s *server) call(ctx context.Context, ms *mcpSession, sess *session, method string, params json.RawMessage) (any, *rpcError) {
	switch method {
	case "initialize":
		return ms.initialize(params)
	case "ping":
		return struct{}{}, nil
	case "tools/list":
		return listTools(ms.version()), nil
	case "tools/call":
		return s.callTool(ctx, ms, sess, params)
	}
	return nil, &rpcError{Code: codeMethodNotFound, Message: "method not found"}
}

// Step 10: the tool.

// tool describes a tool in tools/list.
type tool struct {
	Name         string          `json:"name"`
	Description  string          `json:"description"`
	InputSchema  json.RawMessage `json:"inputSchema"`
	OutputSchema json.RawMessage `json:"outputSchema,omitempty"` // MCP 2025-06-18 and later
}

// userDetailsTool is the one tool: no arguments; its structured result is a
// userDetails object.
var userDetailsTool = tool{
	Name:        "getUserDetails",
	Description: "Returns the signed-in user's display name, mail and user principal name from Microsoft Graph.",
	InputSchema: json.RawMessage(`{"type":"object","properties":{},"additionalProperties":false}`),
	OutputSchema: json.RawMessage(`{"type":"object","properties":{` +
		`"displayName":{"type":"string"},"mail":{"type":"string"},"userPrincipalName":{"type":"string"}},` +
		`"required":["displayName","mail","userPrincipalName"]}`),
}

// tools are the tools this server offers, in tools/list order.
var tools = []tool{userDetailsTool}

// callTool runs tools/call: a switch on the tool's name.
func (s *server) callTool(ctx context.Context, ms *mcpSession, sess *session, params json.RawMessage) (any, *rpcError) {
	var p struct {
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	}
	if err := json.Unmarshal(params, &p); err != nil {
		return nil, &rpcError{Code: codeInvalidParams, Message: "tools/call needs params with a tool name"}
	}
	switch p.Name {
	case userDetailsTool.Name: // no arguments to decode
		return s.getUserDetails(ctx, ms, sess), nil
	}
	return nil, &rpcError{Code: codeInvalidParams, Message: "unknown tool"}
}

// getUserDetails runs the getUserDetails tool.
func (s *server) getUserDetails(ctx context.Context, ms *mcpSession, sess *session) toolResult {
	me, err := s.graphMe(ctx, sess)
	if err != nil {
		return toolResult{Content: []textContent{{"text", "getUserDetails failed: " + err.Error()}}, IsError: true}
	}
	orNone := func(v string) string { return cmp.Or(strings.TrimSpace(v), "(none)") }
	result := toolResult{Content: []textContent{{"text", fmt.Sprintf("Display name: %s\nMail: %s\nUser principal name: %s",
		orNone(me.DisplayName), orNone(me.Mail), orNone(me.UserPrincipalName))}}}
	if structuredResults(ms.version()) {
		result.StructuredContent = me
	}
	return result
}

// graphMe is step 10: GET {GRAPH_URL}/v1.0/me with the session's Entra
// access token. If Graph refuses the token (401: revoked, or expired early),
// the token is refreshed and the call made once more, never more than once.
// Errors are written for the user; the log gets the details.
func (s *server) graphMe(ctx context.Context, sess *session) (*userDetails, error) {
	token, err := s.entraAccessToken(sess, "")
	if err != nil {
		return nil, err
	}
	status, body, err := s.graphGet(ctx, "/v1.0/me", token)
	if err == nil && status == http.StatusUnauthorized {
		if token, err = s.entraAccessToken(sess, token); err != nil {
			return nil, err
		}
		status, body, err = s.graphGet(ctx, "/v1.0/me", token)
	}
	if err != nil {
		return nil, err
	}
	if status != http.StatusOK {
		return nil, s.graphError(status, body)
	}
	// Graph sends null for unset properties; they decode as "".
	var me userDetails
	if err := json.Unmarshal(body, &me); err != nil {
		return nil, errors.New("the answer of Microsoft Graph was not a user profile")
	}
	return &me, nil
}

// ---------------------------------------------------------------------------
// Behind the lesson: protocol versions, MCP sessions and their caps,
// decoding bodies and batches, and result shapes.

// JSON-RPC error codes.
const (
	codeParseError      = -32700 // the body is not JSON
	codeInvalidRequest  = -32600 // JSON, but not a JSON-RPC 2.0 request
	codeMethodNotFound  = -32601 // no such method
	codeInvalidParams   = -32602 // wrong params, or an unknown tool
	codeInternalError   = -32603 // a bug here, not in the request
	codeSessionNotFound = -32001 // unknown or ended MCP session (SDK convention)

	// MCP 2026-07-28 "Error Codes".
	codeHeaderMismatch     = -32020 // an MCP-* header is missing or says otherwise than the body
	codeUnsupportedVersion = -32022 // the request's protocol version is not served here
)

func errorResponse(id json.RawMessage, code int, message string) *rpcResponse {
	return &rpcResponse{JSONRPC: "2.0", ID: id, Error: &rpcError{Code: code, Message: message}}
}

// initializeResult answers initialize.
type initializeResult struct {
	ProtocolVersion string `json:"protocolVersion"`
	Capabilities    struct {
		Tools struct{} `json:"tools"`
	} `json:"capabilities"`
	ServerInfo any `json:"serverInfo"`
}

// initialize negotiates the protocol version (MCP "Lifecycle", Version
// Negotiation): the client's version if this server speaks it, else the newest
// one it speaks, and never an error; a client that cannot use the answer
// disconnects.
func (ms *mcpSession) initialize(params json.RawMessage) (any, *rpcError) {
	var p struct {
		ProtocolVersion string `json:"protocolVersion"`
	}
	if err := json.Unmarshal(params, &p); err != nil || p.ProtocolVersion == "" {
		return nil, &rpcError{Code: codeInvalidParams, Message: "initialize needs params with a protocolVersion string"}
	}
	version := supportedVersions[0]
	if slices.Contains(supportedVersions, p.ProtocolVersion) {
		version = p.ProtocolVersion
	}
	ms.mu.Lock()
	ms.protocolVersion = version
	ms.mu.Unlock()

	result := initializeResult{ProtocolVersion: version, ServerInfo: serverInfo}
	return result, nil
}

// graphGet calls Microsoft Graph with an Entra access token and returns the
// status and body of its answer.
func (s *server) graphGet(ctx context.Context, path, token string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.entra.graphURL+path, nil)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Accept", "application/json")
	resp, err := s.entra.httpClient.Do(req)
	if err != nil {
		s.log.Warn("Microsoft Graph unreachable", "err", err)
		return 0, nil, errors.New("could not reach Microsoft Graph; try again later")
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return 0, nil, errors.New("could not read the answer of Microsoft Graph; try again later")
	}
	return resp.StatusCode, body, nil
}

// supportedVersions are the MCP revisions this server speaks after
// initialize, newest first. MCP 2026-07-28, which has no initialize, is
// served beside them (see [serveModern]).
var supportedVersions = []string{"2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"}

// checkVersionHeader checks the MCP-Protocol-Version header that clients send
// on requests after initialize (MCP 2025-06-18 "Protocol Version Header"): an
// unsupported value is a 400 whose error lists the supported versions. The
// code is not -32022 (UnsupportedProtocolVersion of MCP 2026-07-28): the
// request is of the legacy era, whose clients know no such code.
func checkVersionHeader(r *http.Request) *rpcResponse {
	v := r.Header.Get("MCP-Protocol-Version")
	if v == "" || slices.Contains(supportedVersions, v) {
		return nil
	}
	return errorResponse(nil, codeInvalidRequest, "unsupported MCP-Protocol-Version "+strconv.Quote(v)+"; this server supports "+strings.Join(supportedVersions, ", "))
}

// serverInfo names this server in the initialize result, and in the _meta of
// every MCP 2026-07-28 result.
var serverInfo = struct {
	Name    string `json:"name"`
	Version string `json:"version"`
}{"entra-mcp", "0.1.0"}

// mcpSession is one MCP session, on either transport: what initialize
// negotiated, for whom.
type mcpSession struct {
	id      string    // random; the transport's session id
	owner   string    // id of the signed-in session that opened it
	user    string    // its user's subject: the cap per user counts it
	stream  *stream   // HTTP+SSE: the stream its answers go to; nil on Streamable HTTP
	created time.Time // when it was added

	mu              sync.Mutex
	protocolVersion string // negotiated by initialize
}

// version returns the negotiated protocol version, or "" before initialize.
func (ms *mcpSession) version() string {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	return ms.protocolVersion
}

// maxMCPSessionsPerUser bounds the MCP sessions of one user, over all their
// sign-ins: generous, since clients that restart leave idle sessions behind.
const maxMCPSessionsPerUser = 100

// addMCPSession registers ms for the signed-in session owner. A Streamable
// HTTP session expires after mcpIdleTTL unused; an HTTP+SSE one lives as long
// as its stream. It fails with errStoreFull, or with errSessionEnded if owner
// ended meanwhile: a request that passed the token check just before a
// revocation must not leave a session behind it. endSession marks the owner
// ended before it removes its MCP sessions, and this checks the mark after
// the put, so one of the two always sees the other.
func (s *server) addMCPSession(ms *mcpSession, owner *session) error {
	// One user may hold only so many, however many times they sign in: past
	// that, their oldest makes room, so that one user cannot fill the store
	// for everyone.
	s.userShares.Lock() // counted and taken at once: requests at once cannot each take the last place
	defer s.userShares.Unlock()
	ms.user = owner.subject
	var oldest *mcpSession
	n := 0
	s.mcp.each(func(o *mcpSession, _ time.Time) {
		if o.user == ms.user {
			if n++; oldest == nil || o.created.Before(oldest.created) {
				oldest = o
			}
		}
	})
	if n >= maxMCPSessionsPerUser {
		s.mcp.delete(oldest.id)
		if oldest.stream != nil {
			oldest.stream.end()
		}
	}
	ms.created = s.now()
	ttl := mcpIdleTTL
	if ms.stream != nil {
		ttl = 0
	}
	if err := s.mcp.put(ms.id, ms, ttl); err != nil {
		return err
	}
	if owner.ended.Load() {
		s.mcp.delete(ms.id)
		return errSessionEnded
	}
	return nil
}

// endMCPSessions ends every MCP session of the signed-in session owner,
// closing their streams.
func (s *server) endMCPSessions(owner string) {
	s.mcp.deleteFunc(func(ms *mcpSession) bool {
		if ms.owner != owner {
			return false
		}
		if ms.stream != nil {
			ms.stream.end()
		}
		return true
	})
}

// maxBatch bounds the messages of a batch: each may be a tool call that
// reaches Microsoft Graph.
const maxBatch = 50

// rpcBody is a decoded POST body: one message, or a batch (JSON-RPC 2.0 §6).
type rpcBody struct {
	messages []*rpcMessage
	invalid  []*rpcResponse // errors for a batch's invalid members, answered with the rest
	batch    bool
}

// rpcMemberNames are the member names this server decodes from JSON-RPC
// messages, by path (see [checkMemberNames]); tool arguments are the tool's.
var rpcMemberNames = map[string][]string{
	"":             {"jsonrpc", "id", "method", "params", "result", "error"},
	"params":       {"protocolVersion", "name", "arguments", "_meta"},
	"params._meta": {metaProtocolVersion, metaClientCapabilities},
}

// decodeBody parses a POST body. A body that is neither a message nor a
// batch of them gets the error response to send back instead, with HTTP 400.
func decodeBody(body []byte) (*rpcBody, *rpcResponse) {
	// JSON-RPC is UTF-8 (MCP 2025-03-26, "Transports"); Go's decoder would
	// quietly replace bad bytes. json.Valid also refuses nesting deeper than
	// 10,000 levels.
	if !utf8.Valid(body) || !json.Valid(body) {
		return nil, errorResponse(nil, codeParseError, "parse error: the body is not valid JSON in UTF-8")
	}
	if err := checkMemberNames(body, rpcMemberNames); err != nil {
		return nil, errorResponse(nil, codeInvalidRequest, "invalid request: "+err.Error())
	}
	if !bytes.HasPrefix(bytes.TrimSpace(body), []byte("[")) {
		m, errResp := decodeMessage(body)
		if errResp != nil {
			return nil, errResp
		}
		return &rpcBody{messages: []*rpcMessage{m}}, nil
	}
	var raws []json.RawMessage
	if err := json.Unmarshal(body, &raws); err != nil || len(raws) == 0 || len(raws) > maxBatch {
		return nil, errorResponse(nil, codeInvalidRequest, fmt.Sprintf("invalid request: a batch must hold 1 to %d messages", maxBatch))
	}
	b := &rpcBody{batch: true}
	for _, raw := range raws {
		if m, errResp := decodeMessage(raw); errResp != nil {
			b.invalid = append(b.invalid, errResp)
		} else {
			b.messages = append(b.messages, m)
		}
	}
	return b, nil
}

// isInitialize reports whether the body is a single initialize request.
func (b *rpcBody) isInitialize() bool { return !b.batch && b.messages[0].Method == "initialize" }

// checkBatch enforces the batch rules: batches exist only in MCP 2025-03-26
// (2025-06-18 removed them), and initialize is never part of one.
func (b *rpcBody) checkBatch(ms *mcpSession) *rpcResponse {
	if !b.batch {
		return nil
	}
	if ms.version() != "2025-03-26" {
		return errorResponse(nil, codeInvalidRequest, "batches are only supported in MCP 2025-03-26 sessions: send one message per request")
	}
	for _, m := range b.messages {
		if m.Method == "initialize" {
			return errorResponse(nil, codeInvalidRequest, "initialize cannot be part of a batch")
		}
	}
	return nil
}

// decodeMessage parses one JSON-RPC message. Input that is not one gets the
// error response to send back instead, with a null id unless the id could be
// read (JSON-RPC 2.0 §5).
func decodeMessage(body []byte) (*rpcMessage, *rpcResponse) {
	fail := func(id json.RawMessage, code int, message string) (*rpcMessage, *rpcResponse) {
		return nil, errorResponse(id, code, message)
	}
	var m rpcMessage
	if err := json.Unmarshal(body, &m); err != nil {
		return fail(nil, codeInvalidRequest, "invalid request: not a JSON-RPC message object")
	}
	var id json.RawMessage
	if validID(m.ID) {
		id = m.ID
	}
	switch {
	case m.JSONRPC != "2.0":
		return fail(id, codeInvalidRequest, `invalid request: jsonrpc must be "2.0"`)
	case m.ID != nil && !validID(m.ID):
		return fail(nil, codeInvalidRequest, "invalid request: id must be a string or a number") // MCP: never null
	case m.Method == "" && (m.ID == nil || (m.Result == nil && m.Error == nil)):
		return fail(id, codeInvalidRequest, "invalid request: method is missing")
	}
	return &m, nil
}

// validID reports whether id is a JSON string or number.
func validID(id json.RawMessage) bool {
	if len(id) == 0 {
		return false
	}
	var v any
	if json.Unmarshal(id, &v) != nil {
		return false
	}
	switch v.(type) {
	case string, float64:
		return true
	}
	return false
}

// structuredResults reports whether a session's version knows structured
// tool results (outputSchema and structuredContent, MCP 2025-06-18). Older
// clients get text only. The versions are dates, so they compare as strings.
func structuredResults(version string) bool { return version >= "2025-06-18" }

// listTools is the tools/list result for a session of the given version.
func listTools(version string) toolList {
	list := slices.Clone(tools)
	if !structuredResults(version) {
		for i := range list {
			list[i].OutputSchema = nil
		}
	}
	return toolList{list}
}

type toolList struct {
	Tools []tool `json:"tools"`
}

// toolResult is the result of tools/call. A tool that fails says so here,
// with IsError, so the model can read what went wrong (MCP "Tools", Error
// Handling); JSON-RPC errors are for calls that could not be made at all.
type toolResult struct {
	Content           []textContent `json:"content"`
	StructuredContent any           `json:"structuredContent,omitempty"`
	IsError           bool          `json:"isError,omitempty"`
}

// userDetails is the structured result of getUserDetails.
type userDetails struct {
	DisplayName       string `json:"displayName"`
	Mail              string `json:"mail"`
	UserPrincipalName string `json:"userPrincipalName"`
}

type textContent struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

// graphError logs a Graph error answer and returns the error the user sees.
// Graph errors look like {"error":{"code":"…","message":"…"}}; the code is
// stable, the message is not (and stays out of the log and the answer).
func (s *server) graphError(status int, body []byte) error {
	var e struct {
		Error struct{ Code string } `json:"error"`
	}
	json.Unmarshal(body, &e)
	s.log.Warn("Microsoft Graph error", "status", status, "code", e.Error.Code)
	return fmt.Errorf("the call to Microsoft Graph failed: %d %s", status, e.Error.Code)
}

// writeRPCError answers an HTTP request with a JSON-RPC error, for transport
// errors that belong to no request id.
func writeRPCError(w http.ResponseWriter, status, code int, message string) {
	writeJSON(w, status, errorResponse(nil, code, message))
}

// MCP 2026-07-28, served beside the versions above on /mcp ("Versioning",
// "Backward Compatibility"). A request of that era carries its protocol
// version and client capabilities in params._meta, and mirrors its method
// (and a tool's name) in headers; there is no initialize and no
// Mcp-Session-Id: each request stands alone, with the same bearer token as
// always. Each result says it is complete and names this server.

// modernVersions are the stateless MCP revisions this server speaks.
var modernVersions = []string{"2026-07-28"}

// The _meta keys of MCP 2026-07-28 ("Per-request protocol fields").
const (
	metaProtocolVersion    = "io.modelcontextprotocol/protocolVersion"
	metaClientCapabilities = "io.modelcontextprotocol/clientCapabilities"
	metaServerInfo         = "io.modelcontextprotocol/serverInfo"
)

// isModern reports whether a POST to /mcp belongs to MCP 2026-07-28 or later:
// its body carries the protocol version in _meta or, unless it is an
// initialize or names an MCP session, its MCP-Protocol-Version header names a
// revision newer than the ones initialize negotiates.
func isModern(r *http.Request, b *rpcBody) bool {
	if b.batch {
		return false // only 2025-03-26 sessions send batches
	}
	m := b.messages[0]
	if _, ok := paramsMeta(m)[metaProtocolVersion]; ok {
		return true
	}
	if m.Method == "initialize" || r.Header.Get("Mcp-Session-Id") != "" {
		return false
	}
	return isModernVersion(r.Header.Get("MCP-Protocol-Version"))
}

// isModernVersion reports whether v is a revision date after the newest
// revision that has initialize.
func isModernVersion(v string) bool {
	_, err := time.Parse(time.DateOnly, v)
	return err == nil && v > supportedVersions[0]
}

// paramsMeta returns the _meta object of a message's params, or nil.
func paramsMeta(m *rpcMessage) map[string]json.RawMessage {
	var p struct {
		Meta map[string]json.RawMessage `json:"_meta"`
	}
	json.Unmarshal(m.Params, &p)
	return p.Meta
}

// serveModern answers a request of MCP 2026-07-28: a notification gets 202;
// a request is checked (see [checkModernRequest]) and answered at once, 404
// for a method this server does not have (ping included: 2026-07-28 removed
// it). A signed-in session that ended meanwhile gets 401, as on the legacy
// path.
func (s *server) serveModern(w http.ResponseWriter, r *http.Request, sess *session, b *rpcBody) {
	m := b.messages[0]
	switch {
	case m.Method == "":
		writeRPCError(w, http.StatusBadRequest, codeInvalidRequest, "invalid request: this server sends no requests, so it expects no responses")
		return
	case m.ID == nil:
		w.WriteHeader(http.StatusAccepted) // no notification needs anything done
		return
	}
	version, status, errResp := checkModernRequest(r, m)
	if errResp != nil {
		writeJSON(w, status, errResp)
		return
	}
	result, rpcErr := s.callModern(r.Context(), sess, version, m)
	switch {
	case sess.ended.Load():
		s.writeChallenge(w, "/mcp", errDescSessionEnded)
	case rpcErr != nil && rpcErr.Code == codeMethodNotFound:
		writeJSON(w, http.StatusNotFound, &rpcResponse{JSONRPC: "2.0", ID: m.ID, Error: rpcErr})
	case rpcErr != nil:
		writeJSON(w, http.StatusOK, &rpcResponse{JSONRPC: "2.0", ID: m.ID, Error: rpcErr})
	default:
		writeJSON(w, http.StatusOK, &rpcResponse{JSONRPC: "2.0", ID: m.ID, Result: result})
	}
}

// checkModernRequest checks what MCP 2026-07-28 requires of a request before
// it runs, and returns its protocol version, or the HTTP status and error
// response of the first rule it breaks: the protocol version in _meta (-32602 if missing), the same in the
// MCP-Protocol-Version header (-32020), a version served here (-32022, which
// lists them), the client capabilities in _meta (-32602), and the method, and
// for tools/call the tool's name, mirrored in Mcp-Method and Mcp-Name
// (-32020; "Server Validation"), so that a gateway routing on the headers
// sees what this server runs.
func checkModernRequest(r *http.Request, m *rpcMessage) (string, int, *rpcResponse) {
	fail := func(code int, message string) (string, int, *rpcResponse) {
		return "", http.StatusBadRequest, errorResponse(m.ID, code, message)
	}
	meta := paramsMeta(m)
	var version string
	if json.Unmarshal(meta[metaProtocolVersion], &version) != nil || version == "" {
		return fail(codeInvalidParams, "invalid params: params._meta must carry "+metaProtocolVersion)
	}
	if got, ok := singleHeader(r, "MCP-Protocol-Version"); !ok || got != version {
		return fail(codeHeaderMismatch, fmt.Sprintf("header mismatch: MCP-Protocol-Version %q does not match %s %q", got, metaProtocolVersion, version))
	}
	if !slices.Contains(modernVersions, version) {
		message := "unsupported protocol version " + strconv.Quote(version)
		if slices.Contains(supportedVersions, version) {
			message = "protocol version " + strconv.Quote(version) + " is served only after initialize, in a session"
		}
		resp := errorResponse(m.ID, codeUnsupportedVersion, message)
		resp.Error.Data = map[string]any{"supported": append(slices.Clone(modernVersions), supportedVersions...), "requested": version}
		return "", http.StatusBadRequest, resp
	}
	if caps := meta[metaClientCapabilities]; !bytes.HasPrefix(bytes.TrimSpace(caps), []byte("{")) {
		return fail(codeInvalidParams, "invalid params: params._meta must carry "+metaClientCapabilities+", an object")
	}
	if got, ok := singleHeader(r, "Mcp-Method"); !ok || got != m.Method {
		return fail(codeHeaderMismatch, fmt.Sprintf("header mismatch: Mcp-Method %q does not match the method %q", got, m.Method))
	}
	if m.Method == "tools/call" {
		var p struct {
			Name string `json:"name"`
		}
		json.Unmarshal(m.Params, &p)
		if got, ok := nameHeader(r); !ok || got != p.Name {
			return fail(codeHeaderMismatch, fmt.Sprintf("header mismatch: Mcp-Name does not match the tool name %q", p.Name))
		}
	}
	return version, 0, nil
}

// singleHeader returns the value of the header name, which a request must
// carry once, in plain ASCII: a gateway that read another copy, or decoded it
// otherwise, would route on something else than this server runs.
func singleHeader(r *http.Request, name string) (string, bool) {
	values := r.Header.Values(name)
	if len(values) != 1 || values[0] == "" || strings.ContainsFunc(values[0], func(c rune) bool { return c < 0x20 || c > 0x7e }) {
		return "", false
	}
	return values[0], true
}

// nameHeader returns the value of Mcp-Name, the one header a client may
// write =?base64?…?= when the name is not plain ASCII ("Value Encoding"),
// decoded from that.
func nameHeader(r *http.Request) (string, bool) {
	v, ok := singleHeader(r, "Mcp-Name")
	encoded, isEncoded := strings.CutPrefix(v, "=?base64?")
	if !ok || !isEncoded {
		return v, ok
	}
	encoded, ok = strings.CutSuffix(encoded, "?=")
	decoded, err := base64.StdEncoding.DecodeString(encoded)
	return string(decoded), ok && err == nil && utf8.Valid(decoded)
}

// callModern runs a request of MCP 2026-07-28. The tools are the legacy
// path's own, called in a throwaway MCP session of that version, which is
// never stored.
func (s *server) callModern(ctx context.Context, sess *session, version string, m *rpcMessage) (any, *rpcError) {
	ms := &mcpSession{protocolVersion: version}
	switch m.Method {
	case "server/discover":
		return struct {
			SupportedVersions []string `json:"supportedVersions"`
			Capabilities      any      `json:"capabilities"`
			modernFields
		}{append(slices.Clone(modernVersions), supportedVersions...), initializeResult{}.Capabilities, cacheable()}, nil
	case "tools/list":
		return struct {
			toolList
			modernFields
		}{listTools(ms.version()), cacheable()}, nil
	case "tools/call":
		result, rpcErr := s.callTool(ctx, ms, sess, m.Params)
		if rpcErr != nil {
			return nil, rpcErr
		}
		return struct {
			toolResult
			modernFields
		}{result.(toolResult), complete()}, nil
	}
	return nil, &rpcError{Code: codeMethodNotFound, Message: "method not found: " + m.Method}
}

// modernFields are the members every MCP 2026-07-28 result has: resultType
// and the server's info in _meta; and for a cacheable one, ttlMs and
// cacheScope. (The TypeScript client quietly falls back to initialize when
// server/discover lacks one of them.)
type modernFields struct {
	ResultType string         `json:"resultType"`
	Meta       map[string]any `json:"_meta"`
	TTLMs      *int64         `json:"ttlMs,omitempty"`
	CacheScope string         `json:"cacheScope,omitempty"`
}

func complete() modernFields {
	return modernFields{ResultType: "complete", Meta: map[string]any{metaServerInfo: serverInfo}}
}

// cacheable returns the fields of a result that does not change but with a
// new version of this server, and is the same for every user ("Caching"):
// any cache may keep it an hour.
func cacheable() modernFields {
	f, ttl := complete(), time.Hour.Milliseconds()
	f.TTLMs, f.CacheScope = &ttl, "public"
	return f
}
