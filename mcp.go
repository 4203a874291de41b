package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
)

// Steps 9 and 10: the MCP layer, JSON-RPC 2.0 written out by hand.
//
// The transport hands each decoded message to [server.dispatch], which answers
// initialize (version negotiation), ping, tools/list and tools/call. The one
// tool, getUserDetails, calls Microsoft Graph with the Entra token of the
// caller's session (step 10): the token that arrived with the request is our
// own and never goes anywhere else (MCP 2025-06-18 "Token Passthrough").
//
// Specs: JSON-RPC 2.0; MCP "Lifecycle" and "Tools" (2024-11-05 to 2025-11-25).

// JSON-RPC error codes.
const (
	codeParseError      = -32700 // the body is not JSON
	codeInvalidRequest  = -32600 // JSON, but not a JSON-RPC 2.0 request
	codeMethodNotFound  = -32601 // no such method
	codeInvalidParams   = -32602 // wrong params, or an unknown tool
	codeInternalError   = -32603 // a bug here, not in the request
	codeSessionNotFound = -32001 // unknown or ended MCP session (SDK convention)
)

// supportedVersions are the MCP revisions this server speaks, newest first.
var supportedVersions = []string{"2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"}

// serverInfo names this server in the initialize result.
var serverInfo = struct {
	Name    string `json:"name"`
	Version string `json:"version"`
}{"entra-mcp", "0.1.0"}

// mcpSession is one MCP session: what initialize negotiated, for whom.
type mcpSession struct {
	id    string // random; the transport's session id
	owner string // id of the signed-in session that opened it

	mu              sync.Mutex
	protocolVersion string // negotiated by initialize
}

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
}

// decodeMessage parses one JSON-RPC message. Input that is not one gets the
// error response to send back instead, with a null id unless the id could be
// read (JSON-RPC 2.0 §5).
func decodeMessage(body []byte) (*rpcMessage, *rpcResponse) {
	fail := func(id json.RawMessage, code int, message string) (*rpcMessage, *rpcResponse) {
		return nil, &rpcResponse{JSONRPC: "2.0", ID: id, Error: &rpcError{Code: code, Message: message}}
	}
	if !json.Valid(body) {
		return fail(nil, codeParseError, "parse error: the body is not valid JSON")
	}
	if bytes.HasPrefix(bytes.TrimSpace(body), []byte("[")) {
		return fail(nil, codeInvalidRequest, "batches are not supported: send one message per request")
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
		return toolsList, nil
	case "tools/call":
		return s.callTool(ctx, sess, params)
	}
	return nil, &rpcError{Code: codeMethodNotFound, Message: "method not found"}
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

// tool describes a tool in tools/list.
type tool struct {
	Name        string          `json:"name"`
	Description string          `json:"description"`
	InputSchema json.RawMessage `json:"inputSchema"`
}

// toolsList is the tools/list result: one tool, without arguments.
var toolsList = struct {
	Tools []tool `json:"tools"`
}{[]tool{{
	Name:        "getUserDetails",
	Description: "Returns the signed-in user's display name, mail and user principal name from Microsoft Graph.",
	InputSchema: json.RawMessage(`{"type":"object","properties":{},"additionalProperties":false}`),
}}}

// toolResult is the result of tools/call. A tool that fails says so here,
// with IsError, so the model can read what went wrong (MCP "Tools", Error
// Handling); JSON-RPC errors are for calls that could not be made at all.
type toolResult struct {
	Content []textContent `json:"content"`
	IsError bool          `json:"isError,omitempty"`
}

type textContent struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

// callTool runs tools/call.
func (s *server) callTool(ctx context.Context, sess *session, params json.RawMessage) (any, *rpcError) {
	var p struct {
		Name string `json:"name"`
	}
	if err := json.Unmarshal(params, &p); err != nil {
		return nil, &rpcError{Code: codeInvalidParams, Message: "tools/call needs params with a tool name"}
	}
	if p.Name != "getUserDetails" {
		return nil, &rpcError{Code: codeInvalidParams, Message: "unknown tool"}
	}
	text, err := s.userDetails(ctx, sess)
	if err != nil {
		return toolResult{Content: []textContent{{"text", "getUserDetails failed: " + err.Error()}}, IsError: true}, nil
	}
	return toolResult{Content: []textContent{{"text", text}}}, nil
}

// userDetails is step 10: GET {GRAPH_URL}/v1.0/me with the session's Entra
// access token, which the session's token source refreshes first if it has
// expired. Errors are written for the user; the log gets the details.
func (s *server) userDetails(ctx context.Context, sess *session) (string, error) {
	tok, err := sess.entra.Token()
	if err != nil {
		s.log.Warn("Entra token refresh failed", "subject", sess.subject, "err", err)
		return "", errors.New("your Microsoft sign-in could not be renewed; sign in again")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.entra.graphURL+"/v1.0/me", nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "Bearer "+tok.AccessToken)
	req.Header.Set("Accept", "application/json")
	resp, err := s.entra.httpClient.Do(req)
	if err != nil {
		s.log.Warn("Microsoft Graph unreachable", "err", err)
		return "", errors.New("could not reach Microsoft Graph; try again later")
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", errors.New("could not read the answer of Microsoft Graph; try again later")
	}
	if resp.StatusCode != http.StatusOK {
		// Graph errors look like {"error":{"code":"…","message":"…"}}; the
		// code is stable, the message is not (and stays in the log).
		var e struct {
			Error struct{ Code string } `json:"error"`
		}
		json.Unmarshal(body, &e)
		s.log.Warn("Microsoft Graph error", "status", resp.StatusCode, "code", e.Error.Code, "request_id", resp.Header.Get("request-id"))
		return "", fmt.Errorf("the call to Microsoft Graph failed: %d %s", resp.StatusCode, e.Error.Code)
	}
	var me struct {
		DisplayName       string `json:"displayName"`
		Mail              string `json:"mail"`
		UserPrincipalName string `json:"userPrincipalName"`
	}
	if err := json.Unmarshal(body, &me); err != nil {
		return "", errors.New("the answer of Microsoft Graph was not a user profile")
	}
	orNone := func(v string) string {
		if strings.TrimSpace(v) == "" {
			return "(none)"
		}
		return v
	}
	return fmt.Sprintf("Display name: %s\nMail: %s\nUser principal name: %s",
		orNone(me.DisplayName), orNone(me.Mail), orNone(me.UserPrincipalName)), nil
}

// writeRPCError answers an HTTP request with a JSON-RPC error, for transport
// errors that belong to no request id.
func writeRPCError(w http.ResponseWriter, status, code int, message string) {
	writeJSON(w, status, &rpcResponse{JSONRPC: "2.0", Error: &rpcError{Code: code, Message: message}})
}
