package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"sync"
	"time"
)

// Steps 8 and 9: the HTTP+SSE transport of MCP 2024-11-05 ("HTTP with SSE").
//
// The client opens GET /sse with its session token (step 8). The stream's
// first event, "endpoint", names where to POST: /message?sessionId=<id>. Each
// JSON-RPC message the client POSTs there (step 9) gets 202 Accepted, and its
// response arrives on the stream as a "message" event. The stream is the MCP
// session: when it closes, the session ends and its id stops working.
//
// Server-sent events are framed as in the WHATWG HTML standard, §9.2
// "Server-sent events": "event:" and "data:" lines, then a blank line.

// maxMessageSize bounds a POSTed JSON-RPC message.
const maxMessageSize = 1 << 20

// stream is one open SSE stream and the MCP session that lives on it.
type stream struct {
	mcp  *mcpSession
	out  chan []byte   // JSON-RPC messages waiting to be sent as "message" events
	done chan struct{} // closed when the stream ends
	once sync.Once
}

// end makes the stream's handler return.
func (st *stream) end() { st.once.Do(func() { close(st.done) }) }

// streamRegistry holds the open streams by MCP session id.
type streamRegistry struct {
	mu      sync.Mutex
	streams map[string]*stream
}

func newStreamRegistry() *streamRegistry {
	return &streamRegistry{streams: make(map[string]*stream)}
}

func (reg *streamRegistry) add(st *stream) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	reg.streams[st.mcp.id] = st
}

func (reg *streamRegistry) remove(st *stream) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	delete(reg.streams, st.mcp.id)
}

func (reg *streamRegistry) get(id string) (*stream, bool) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	st, ok := reg.streams[id]
	return st, ok
}

// closeSession ends every stream opened with the signed-in session owner.
func (reg *streamRegistry) closeSession(owner string) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	for _, st := range reg.streams {
		if st.mcp.owner == owner {
			st.end()
		}
	}
}

// handleSSE is step 8: it opens the event stream of one MCP session and
// writes its events until the client goes away, the session ends or the
// server shuts down.
func (s *server) handleSSE(w http.ResponseWriter, r *http.Request) {
	sess := s.authenticate(w, r, "/sse")
	if sess == nil {
		return
	}
	st := &stream{
		mcp:  &mcpSession{id: newSecret(), owner: sess.id},
		out:  make(chan []byte, 32),
		done: make(chan struct{}),
	}
	s.streams.add(st)
	defer st.end()             // second: mark the stream ended
	defer s.streams.remove(st) // first: unregister it

	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // tell nginx and friends not to buffer the stream
	w.WriteHeader(http.StatusOK)

	// The endpoint event must come first. A path-absolute URL resolves
	// against the /sse URL, which keeps it on the same origin, as clients
	// require.
	writeEvent(w, "endpoint", []byte("/message?sessionId="+st.mcp.id))
	rc := http.NewResponseController(w)
	keepAlive := time.NewTicker(s.keepAlive)
	defer keepAlive.Stop()
	for {
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

// writeEvent writes one server-sent event. data is one line of JSON (or the
// endpoint URL), so a single "data:" line carries it.
func writeEvent(w io.Writer, event string, data []byte) {
	fmt.Fprintf(w, "event: %s\ndata: %s\n\n", event, data)
}

// handleMessage is step 9: it takes one JSON-RPC message for the session
// named by ?sessionId=, runs it, and queues the response on that session's
// stream. The POST itself is answered 202 once the response is queued, so
// the HTTP status can still report failures found while handling it.
func (s *server) handleMessage(w http.ResponseWriter, r *http.Request) {
	// A 401 here points at the /sse metadata: /message is part of the /sse
	// resource, and clients re-authorize against the URL they connected to.
	sess := s.authenticate(w, r, "/sse")
	if sess == nil {
		return
	}
	id := r.URL.Query().Get("sessionId")
	if id == "" {
		writeRPCError(w, http.StatusBadRequest, codeInvalidRequest, "sessionId is missing")
		return
	}
	// Another user's session looks exactly like an unknown one: a session id
	// is never proof of identity (MCP security best practices, "Session
	// Hijacking").
	st, ok := s.streams.get(id)
	if !ok || st.mcp.owner != sess.id {
		writeRPCError(w, http.StatusNotFound, codeSessionNotFound, "session not found")
		return
	}
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json" {
		writeRPCError(w, http.StatusUnsupportedMediaType, codeInvalidRequest, "Content-Type must be application/json")
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxMessageSize))
	if err != nil {
		if errors.As(err, new(*http.MaxBytesError)) {
			writeRPCError(w, http.StatusRequestEntityTooLarge, codeInvalidRequest, "message too large")
		}
		return
	}
	msg, errResp := decodeMessage(body)
	if errResp != nil {
		writeJSON(w, http.StatusBadRequest, errResp)
		return
	}
	if resp := s.dispatch(r.Context(), st.mcp, sess, msg); resp != nil {
		out, err := json.Marshal(resp)
		if err != nil {
			s.log.Error("encode JSON-RPC response", "method", msg.Method, "err", err)
			writeRPCError(w, http.StatusInternalServerError, codeInternalError, "internal error")
			return
		}
		select {
		case st.out <- out:
		case <-st.done:
			writeRPCError(w, http.StatusNotFound, codeSessionNotFound, "session ended")
			return
		case <-r.Context().Done():
			return
		}
	}
	w.WriteHeader(http.StatusAccepted)
	io.WriteString(w, "Accepted")
}
