package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Steps 8 and 9: the two HTTP transports of MCP. Both carry the session
// token on every request (step 1 checks it) and hand JSON-RPC to the same
// dispatcher (mcp.go); this file owns only the HTTP and the framing.
//
// HTTP+SSE (MCP 2024-11-05), for older clients: GET /sse opens a stream (step
// 8) whose first event names where to POST: /message?sessionId=<id>. Each
// message POSTed there (step 9) gets 202, and its answer comes on the stream.
// The stream is the MCP session: when it closes, the session ends.
//
// Streamable HTTP (MCP 2025-03-26 to 2025-11-25), for current clients: every
// message is a POST to /mcp, answered in the response as application/json;
// initialize returns an Mcp-Session-Id that later requests carry. (MCP
// 2026-07-28 has neither, see [server.serveModern].)

// mcpRequest runs the checks every request to an MCP endpoint passes first,
// and returns the caller's session, or nil once it has answered: the Origin
// of a browser page (403, see [server.originAllowed]), then the bearer token
// for endpoint (step 1: 401).
func (s *server) mcpRequest(w http.ResponseWriter, r *http.Request, endpoint string) *session {
	if origin := r.Header.Get("Origin"); origin != "" && !s.originAllowed(origin) {
		writeRPCError(w, http.StatusForbidden, codeInvalidRequest, "origin not allowed")
		return nil
	}
	return s.authenticate(w, r, endpoint)
}

// HTTP+SSE.

// handleSSE is step 8 on HTTP+SSE: it opens the event stream of a new MCP
// session and writes its events until the client goes away, the session ends
// or the server shuts down.
func (s *server) handleSSE(w http.ResponseWriter, r *http.Request) {
	sess := s.mcpRequest(w, r, "/sse")
	if sess == nil {
		return
	}
	st := &stream{out: make(chan []byte, 32), done: make(chan struct{})}
	ms := &mcpSession{id: newSecret(), owner: sess.id, stream: st}
	if err := s.addMCPSession(ms, sess); err != nil {
		s.refuseMCPSession(w, "/sse", err)
		return
	}
	defer st.end()            // second: mark the stream ended
	defer s.mcp.delete(ms.id) // first: unregister the session

	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // tell nginx and friends not to buffer the stream
	w.WriteHeader(http.StatusOK)

	// The endpoint event comes first. A path-absolute URL keeps it on the
	// origin of the /sse URL, as clients require.
	writeEvent(w, "endpoint", []byte("/message?sessionId="+ms.id))
	rc := http.NewResponseController(w)
	keepAlive := time.NewTicker(s.keepAlive)
	defer keepAlive.Stop()
	for {
		// A client that stops reading must not hold the stream for ever: a
		// write that cannot finish in time ends it.
		rc.SetWriteDeadline(time.Now().Add(s.streamStall))
		if err := rc.Flush(); err != nil {
			return
		}
		select {
		case msg := <-st.out:
			writeEvent(w, "message", msg)
		case <-keepAlive.C:
			// A comment line: clients ignore it, proxies see traffic.
			io.WriteString(w, ": keep-alive\n\n")
		case <-st.done:
			return
		case <-s.closing:
			return
		case <-r.Context().Done():
			return
		}
	}
}

// handleMessage is step 9 on HTTP+SSE: it runs the body POSTed for the
// session named by ?sessionId= and queues the answer on that session's
// stream. The POST is answered 202 once the answer is queued, so the HTTP
// status can still report failures found while handling it.
func (s *server) handleMessage(w http.ResponseWriter, r *http.Request) {
	// A 401 here points at the /sse metadata: /message is part of the /sse
	// resource, and clients re-authorize against the URL they connected to.
	sess := s.mcpRequest(w, r, "/sse")
	if sess == nil {
		return
	}
	ms, ok := s.findMCPSession(w, r.URL.Query().Get("sessionId"), sess, true)
	if !ok {
		return
	}
	body, ok := s.readBody(w, r)
	if !ok {
		return
	}
	reply, ok := s.runBody(w, r, "/sse", ms, sess, body)
	if !ok {
		return
	}
	if reply != nil && !s.queueOnStream(w, r, ms, sess, reply) {
		return
	}
	w.WriteHeader(http.StatusAccepted)
	io.WriteString(w, "Accepted")
}

// Streamable HTTP.

// handleMCPPost is steps 8 and 9 on Streamable HTTP: a POST to /mcp carries
// one JSON-RPC message (or, in a 2025-03-26 session, a batch), and its answer
// comes back in the response. initialize starts a session; every later request
// names it in Mcp-Session-Id (but in MCP 2026-07-28, which has no sessions).
func (s *server) handleMCPPost(w http.ResponseWriter, r *http.Request) {
	sess := s.mcpRequest(w, r, "/mcp")
	if sess == nil {
		return
	}
	if !acceptsJSONAndEvents(r.Header.Values("Accept")) {
		writeRPCError(w, http.StatusNotAcceptable, codeInvalidRequest, "Accept must allow application/json and text/event-stream")
		return
	}
	body, ok := s.readBody(w, r)
	if !ok {
		return
	}
	if isModern(r, body) { // MCP 2026-07-28: no initialize, no session (serveModern)
		s.serveModern(w, r, sess, body)
		return
	}

	// A 404 for an unknown session tells the client to start a new one with
	// initialize (MCP "Session Management").
	id := r.Header.Get("Mcp-Session-Id")
	var ms *mcpSession
	switch {
	case body.isInitialize() && id != "":
		if _, ok := s.findMCPSession(w, id, sess, false); ok {
			writeRPCError(w, http.StatusBadRequest, codeInvalidRequest, "this session is already initialized; send initialize without Mcp-Session-Id to start a new one")
		}
		return
	case body.isInitialize():
		ms = &mcpSession{id: newSecret(), owner: sess.id}
	case id == "":
		writeRPCError(w, http.StatusBadRequest, codeInvalidRequest, "Mcp-Session-Id is missing: send initialize first")
		return
	default:
		if ms, ok = s.findMCPSession(w, id, sess, false); !ok {
			return
		}
	}
	reply, ok := s.runBody(w, r, "/mcp", ms, sess, body)
	if !ok {
		return
	}
	if body.isInitialize() {
		if resp, ok := reply.(*rpcResponse); ok && resp.Error == nil {
			if err := s.addMCPSession(ms, sess); err != nil {
				s.refuseMCPSession(w, "/mcp", err)
				return
			}
			w.Header().Set("Mcp-Session-Id", ms.id)
		}
	}
	if reply == nil {
		// Only notifications and responses: nothing to answer.
		w.WriteHeader(http.StatusAccepted)
		return
	}
	writeJSON(w, http.StatusOK, reply)
}

// ---------------------------------------------------------------------------
// Behind the lesson: ending a session with DELETE, the Origin check, finding
// and refusing MCP sessions, reading bodies, the stream's queue and framing,
// and Accept headers.

// handleMCPDelete ends a Streamable HTTP session (MCP "Session Management"):
// 204, and the session id gets 404 from then on. MCP 2026-07-28 has no
// sessions: a DELETE of that era gets 405.
func (s *server) handleMCPDelete(w http.ResponseWriter, r *http.Request) {
	sess := s.mcpRequest(w, r, "/mcp")
	if sess == nil {
		return
	}
	if isModernVersion(r.Header.Get("MCP-Protocol-Version")) {
		// MCP 2026-07-28 has no sessions to end ("Backward Compatibility").
		w.Header().Set("Allow", "POST")
		writeRPCError(w, http.StatusMethodNotAllowed, codeInvalidRequest, "method not allowed: MCP 2026-07-28 has no sessions to end")
		return
	}
	if errResp := checkVersionHeader(r); errResp != nil {
		writeJSON(w, http.StatusBadRequest, errResp)
		return
	}
	ms, ok := s.findMCPSession(w, r.Header.Get("Mcp-Session-Id"), sess, false)
	if !ok {
		return
	}
	s.mcp.delete(ms.id)
	w.WriteHeader(http.StatusNoContent)
}

// maxMessageSize bounds a POSTed JSON-RPC body.
const maxMessageSize = 1 << 20

// originAllowed reports whether pages from origin may use the MCP endpoints.
// A page on another site must not reach an MCP server on this machine
// through the user's browser, for example by rebinding its own DNS name to
// 127.0.0.1 (MCP 2025-11-25 "Transports", Security Warning). Allowed are
// PUBLIC_URL's origin, loopback origins on any port, and ALLOWED_ORIGINS.
// Requests without Origin come from programs, not pages, and pass.
func (s *server) originAllowed(origin string) bool {
	u, err := url.Parse(origin)
	return err == nil && u.Host != "" && u.User == nil && u.Path == "" &&
		(u.Scheme == "http" || u.Scheme == "https") &&
		(normalOrigin(u) == s.cfg.publicURL || isLoopbackHost(u.Hostname()) || slices.Contains(s.cfg.allowedOrigins, normalOrigin(u)))
}

// findMCPSession returns the caller's MCP session named id, on one transport
// (sse: the HTTP+SSE one), or answers 400 if the request named none, and 404
// if it is not the caller's: unknown, ended, another user's and the other
// transport's sessions all look alike.
func (s *server) findMCPSession(w http.ResponseWriter, id string, sess *session, sse bool) (*mcpSession, bool) {
	if id == "" {
		writeRPCError(w, http.StatusBadRequest, codeInvalidRequest, "the session id is missing")
		return nil, false
	}
	ms, ok := s.mcp.get(id)
	if !ok || ms.owner != sess.id || (ms.stream != nil) != sse {
		writeRPCError(w, http.StatusNotFound, codeSessionNotFound, "session not found")
		return nil, false
	}
	if !sse {
		s.mcp.touch(id, mcpIdleTTL) // in use: not idle
	}
	return ms, true
}

// refuseMCPSession answers a request whose new MCP session addMCPSession
// refused: 401 if the signed-in session has ended, else 503.
func (s *server) refuseMCPSession(w http.ResponseWriter, endpoint string, err error) {
	if errors.Is(err, errSessionEnded) {
		s.writeChallenge(w, endpoint, errDescSessionEnded)
		return
	}
	w.Header().Set("Retry-After", "60")
	writeRPCError(w, http.StatusServiceUnavailable, codeInternalError, "too many open MCP sessions; try again later")
}

// readBody reads and decodes a POSTed JSON-RPC body, answering transport
// errors itself: 415 for a body that is not JSON, 413 for one too large, 400
// for a body that is not JSON-RPC. The MCP-Protocol-Version header is checked
// once the era is known: by runBody, or by serveModern.
func (s *server) readBody(w http.ResponseWriter, r *http.Request) (*rpcBody, bool) {
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json" {
		writeRPCError(w, http.StatusUnsupportedMediaType, codeInvalidRequest, "Content-Type must be application/json")
		return nil, false
	}
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxMessageSize))
	if err != nil {
		if errors.As(err, new(*http.MaxBytesError)) {
			writeRPCError(w, http.StatusRequestEntityTooLarge, codeInvalidRequest, "message too large")
		} else {
			writeRPCError(w, http.StatusBadRequest, codeInvalidRequest, "the body could not be read")
		}
		return nil, false
	}
	body, errResp := decodeBody(raw)
	if errResp != nil {
		writeJSON(w, http.StatusBadRequest, errResp)
		return nil, false
	}
	return body, true
}

// runBody runs a decoded body in the MCP session ms and returns what to
// answer, or answers the request itself and returns false: 400 for an
// unsupported MCP-Protocol-Version or a batch the session may not send, 401
// if the signed-in session ended meanwhile.
func (s *server) runBody(w http.ResponseWriter, r *http.Request, endpoint string, ms *mcpSession, sess *session, body *rpcBody) (any, bool) {
	if errResp := checkVersionHeader(r); errResp != nil {
		writeJSON(w, http.StatusBadRequest, errResp)
		return nil, false
	}
	if errResp := body.checkBatch(ms); errResp != nil {
		writeJSON(w, http.StatusBadRequest, errResp)
		return nil, false
	}
	reply, err := s.respond(r.Context(), ms, sess, body)
	if err != nil {
		s.writeChallenge(w, endpoint, errDescSessionEnded)
		return nil, false
	}
	return reply, true
}

// stream is the open event stream of an HTTP+SSE session.
type stream struct {
	out  chan []byte   // JSON-RPC messages waiting to be sent as "message" events (a few)
	done chan struct{} // closed when the stream ends
	once sync.Once
}

// end makes the stream's handler return.
func (st *stream) end() { st.once.Do(func() { close(st.done) }) }

// queueOnStream queues reply for ms's stream, or answers the request itself
// and returns false. The queue is short: a client that stopped reading its
// stream gets its session closed, rather than answers queued without bound.
func (s *server) queueOnStream(w http.ResponseWriter, r *http.Request, ms *mcpSession, sess *session, reply any) bool {
	out, err := json.Marshal(reply)
	if err != nil {
		s.log.Error("encode JSON-RPC response", "err", err)
		writeRPCError(w, http.StatusInternalServerError, codeInternalError, "internal error")
		return false
	}
	stalled := time.NewTimer(s.streamStall)
	defer stalled.Stop()
	select {
	case ms.stream.out <- out:
		return true
	case <-ms.stream.done:
		writeRPCError(w, http.StatusNotFound, codeSessionNotFound, "session ended")
	case <-r.Context().Done():
	case <-stalled.C:
		s.log.Warn("SSE stream not read; closing it", "subject", sess.subject)
		ms.stream.end()
		writeRPCError(w, http.StatusServiceUnavailable, codeInternalError, "the event stream was not being read, and is now closed; connect again")
	}
	return false
}

// writeEvent writes one server-sent event, framed as in the WHATWG HTML
// standard, §9.2 "Server-sent events": "event:" and "data:" lines, then a
// blank line. data is one line of JSON (or the endpoint URL), so a single
// "data:" line carries it.
func writeEvent(w io.Writer, event string, data []byte) {
	fmt.Fprintf(w, "event: %s\ndata: %s\n\n", event, data)
}

// acceptsJSONAndEvents reports whether the Accept header allows both answers
// Streamable HTTP may give: application/json and text/event-stream. Clients
// must list both; a missing or empty header, */* and application/* are taken
// to allow them too, since this server only ever answers JSON. A type with
// q=0 is refused (RFC 9110 §12.5.1).
func acceptsJSONAndEvents(accept []string) bool {
	if strings.TrimSpace(strings.Join(accept, "")) == "" {
		return true
	}
	var jsonOK, eventsOK bool
	for _, v := range accept {
		for part := range strings.SplitSeq(v, ",") {
			mt, params, _ := mime.ParseMediaType(strings.TrimSpace(part))
			if q, err := strconv.ParseFloat(params["q"], 64); err == nil && q == 0 {
				continue
			}
			switch mt {
			case "*/*", "application/*":
				jsonOK, eventsOK = true, true
			case "application/json":
				jsonOK = true
			case "text/event-stream", "text/*":
				eventsOK = true
			}
		}
	}
	return jsonOK && eventsOK
}

// handleMCPOther answers every other method on /mcp, GET included, with 405
// once the request is authenticated: this server opens no server-to-client
// stream, which MCP allows (2025-06-18 "Listening for Messages from the
// Server").
func (s *server) handleMCPOther(w http.ResponseWriter, r *http.Request) {
	if s.mcpRequest(w, r, "/mcp") == nil {
		return
	}
	w.Header().Set("Allow", "POST, DELETE")
	writeRPCError(w, http.StatusMethodNotAllowed, codeInvalidRequest, "method not allowed: use POST, or DELETE to end the session")
}
