// Command gorilla_hub is a peer hub for the tidings benchmark: Go + gorilla/websocket.
//
// It is the classic gorilla hub: one hub goroutine owns all state (clients,
// topic subscriptions, per-topic seqs) and is driven over channels (register,
// unregister, commands); each client has a readPump goroutine that reads and
// decodes frames and a writePump goroutine that writes what arrives on its
// buffered `send chan []byte` (256) and pings every 30 s. The hub never blocks on
// a client: a send to a full channel is dropped (select default) and counted, so
// a slow client sees a seq gap and nobody else is slowed.
//
// Each event is encoded once per publish and the same []byte goes to every
// subscriber; writePump writes every queued message as its own text frame
// (no newline-joined coalescing as in the chat example), draining the channel
// after each wake-up so one write deadline covers a burst.
//
// Run: gorilla_hub --port 8803   (--port 0 picks a free port)
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

const (
	host           = "127.0.0.1"
	wsPath         = "/ws"
	sendQueueSize  = 256
	maxMessageSize = 512 * 1024
	writeWait      = 10 * time.Second // a write blocked longer drops the client
	pongWait       = 60 * time.Second // silent this long (no pong): closed
	pingPeriod     = 30 * time.Second // a ping every 30 s
)

var (
	connections atomic.Int64
	dropped     atomic.Int64
)

var upgrader = websocket.Upgrader{
	ReadBufferSize:  1024,
	WriteBufferSize: 1024,
	// Idle connections hold no write buffer: it is taken from the pool per message.
	WriteBufferPool:   &sync.Pool{},
	EnableCompression: false,
	// The load generator and the smoke test connect from 127.0.0.1 without an Origin.
	CheckOrigin: func(r *http.Request) bool { return true },
}

// Client is one WebSocket connection.
type Client struct {
	hub    *Hub
	conn   *websocket.Conn
	send   chan []byte
	topics map[string]struct{} // owned by the hub goroutine
}

type cmdKind int

const (
	cmdSubscribe cmdKind = iota
	cmdUnsubscribe
	cmdPublish
)

// command is a decoded request, handed from a readPump to the hub.
type command struct {
	kind      cmdKind
	client    *Client
	topic     string
	topicJSON []byte          // the topic, JSON-encoded once in the readPump
	requestID json.RawMessage // echoed back verbatim (nil: absent)
	payload   json.RawMessage // publish: passed through unchanged
}

// Hub owns all shared state; only its run goroutine touches it.
type Hub struct {
	clients    map[*Client]struct{}
	topics     map[string]map[*Client]struct{}
	seqs       map[string]uint64
	register   chan *Client
	unregister chan *Client
	commands   chan command
}

func newHub() *Hub {
	return &Hub{
		clients:    make(map[*Client]struct{}),
		topics:     make(map[string]map[*Client]struct{}),
		seqs:       make(map[string]uint64),
		register:   make(chan *Client),
		unregister: make(chan *Client),
		commands:   make(chan command, 1024),
	}
}

// trySend queues msg for c, dropping it when c's queue is full.
func trySend(c *Client, msg []byte) {
	select {
	case c.send <- msg:
	default:
		dropped.Add(1)
	}
}

func (h *Hub) run() {
	for {
		select {
		case c := <-h.register:
			h.clients[c] = struct{}{}
		case c := <-h.unregister:
			if _, ok := h.clients[c]; ok {
				for topic := range c.topics {
					h.removeSub(topic, c)
				}
				delete(h.clients, c)
				close(c.send)
			}
		case cmd := <-h.commands:
			if _, ok := h.clients[cmd.client]; !ok {
				continue // already unregistered
			}
			h.handle(cmd)
		}
	}
}

func (h *Hub) removeSub(topic string, c *Client) {
	if subs, ok := h.topics[topic]; ok {
		delete(subs, c)
		if len(subs) == 0 {
			delete(h.topics, topic)
		}
	}
	delete(c.topics, topic)
}

func (h *Hub) handle(cmd command) {
	c := cmd.client
	switch cmd.kind {
	case cmdPublish:
		seq := h.seqs[cmd.topic] + 1
		h.seqs[cmd.topic] = seq
		if subs := h.topics[cmd.topic]; len(subs) > 0 {
			ev := make([]byte, 0, 96+len(cmd.topicJSON)+len(cmd.payload))
			ev = append(ev, `{"type":"event","topic":`...)
			ev = append(ev, cmd.topicJSON...)
			ev = append(ev, `,"seq":`...)
			ev = strconv.AppendUint(ev, seq, 10)
			ev = append(ev, `,"payload":`...)
			ev = append(ev, cmd.payload...)
			ev = append(ev, `,"timestamp":"`...)
			ev = time.Now().UTC().AppendFormat(ev, "2006-01-02T15:04:05.000Z07:00")
			ev = append(ev, `"}`...)
			for sub := range subs {
				trySend(sub, ev)
			}
		}
		b := responseHead(cmd)
		b = append(b, `,"payload":{"status":"published","seq":`...)
		b = strconv.AppendUint(b, seq, 10)
		trySend(c, append(b, "}}"...))
	case cmdSubscribe:
		subs, ok := h.topics[cmd.topic]
		if !ok {
			subs = make(map[*Client]struct{})
			h.topics[cmd.topic] = subs
		}
		subs[c] = struct{}{}
		c.topics[cmd.topic] = struct{}{}
		b := responseHead(cmd)
		b = append(b, `,"payload":{"status":"subscribed","topic":`...)
		b = append(b, cmd.topicJSON...)
		b = append(b, `,"seq":`...)
		b = strconv.AppendUint(b, h.seqs[cmd.topic], 10)
		trySend(c, append(b, "}}"...))
	case cmdUnsubscribe:
		h.removeSub(cmd.topic, c)
		b := responseHead(cmd)
		b = append(b, `,"payload":{"status":"unsubscribed","topic":`...)
		b = append(b, cmd.topicJSON...)
		trySend(c, append(b, "}}"...))
	}
}

// responseHead starts a response frame: {"type":"response","topic":T[,"requestId":R]
func responseHead(cmd command) []byte {
	b := make([]byte, 0, 128+2*len(cmd.topicJSON))
	b = append(b, `{"type":"response","topic":`...)
	b = append(b, cmd.topicJSON...)
	if cmd.requestID != nil {
		b = append(b, `,"requestId":`...)
		b = append(b, cmd.requestID...)
	}
	return b
}

func errorFrame(message string) []byte {
	b, _ := json.Marshal(struct {
		Type    string `json:"type"`
		Payload struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"payload"`
	}{Type: "error", Payload: struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}{"invalid_message", message}})
	return b
}

// request is what a client may send.
type request struct {
	Type      string          `json:"type"`
	Topic     json.RawMessage `json:"topic"`
	RequestID json.RawMessage `json:"requestId"`
	Payload   json.RawMessage `json:"payload"`
}

// decode turns one frame into a command, or returns an error frame.
func decode(c *Client, data []byte) (command, []byte) {
	var req request
	if err := json.Unmarshal(data, &req); err != nil {
		return command{}, errorFrame("message must be a JSON object")
	}
	cmd := command{client: c}
	switch req.Type {
	case "subscribe":
		cmd.kind = cmdSubscribe
	case "unsubscribe":
		cmd.kind = cmdUnsubscribe
	case "publish":
		cmd.kind = cmdPublish
		if req.Payload == nil {
			return command{}, errorFrame("field 'payload' is required")
		}
		cmd.payload = req.Payload
	default:
		return command{}, errorFrame("unknown message type")
	}
	if err := json.Unmarshal(req.Topic, &cmd.topic); err != nil || cmd.topic == "" {
		return command{}, errorFrame("field 'topic' must be a non-empty string")
	}
	cmd.topicJSON, _ = json.Marshal(cmd.topic) // canonical form of the topic string
	if len(req.RequestID) > 0 && string(req.RequestID) != "null" {
		cmd.requestID = req.RequestID
	}
	return cmd, nil
}

// readPump reads frames from the connection and hands commands to the hub.
func (c *Client) readPump() {
	defer func() {
		c.hub.unregister <- c
		c.conn.Close()
	}()
	c.conn.SetReadLimit(maxMessageSize)
	c.conn.SetReadDeadline(time.Now().Add(pongWait))
	c.conn.SetPongHandler(func(string) error {
		c.conn.SetReadDeadline(time.Now().Add(pongWait))
		return nil
	})
	for {
		_, data, err := c.conn.ReadMessage()
		if err != nil {
			return
		}
		cmd, errFrame := decode(c, data)
		if errFrame != nil {
			trySend(c, errFrame) // c is registered until this goroutine unregisters it
			continue
		}
		c.hub.commands <- cmd
	}
}

// writePump writes queued messages (one text frame each) and pings.
func (c *Client) writePump() {
	ticker := time.NewTicker(pingPeriod)
	defer func() {
		ticker.Stop()
		c.conn.Close()
	}()
	for {
		select {
		case msg, ok := <-c.send:
			c.conn.SetWriteDeadline(time.Now().Add(writeWait))
			if !ok {
				// The hub closed the channel.
				c.conn.WriteMessage(websocket.CloseMessage, []byte{})
				return
			}
			if err := c.conn.WriteMessage(websocket.TextMessage, msg); err != nil {
				return
			}
			// Drain what queued up meanwhile, still one frame per message.
			for n := len(c.send); n > 0; n-- {
				msg, ok = <-c.send
				if !ok {
					c.conn.WriteMessage(websocket.CloseMessage, []byte{})
					return
				}
				if err := c.conn.WriteMessage(websocket.TextMessage, msg); err != nil {
					return
				}
			}
		case <-ticker.C:
			c.conn.SetWriteDeadline(time.Now().Add(writeWait))
			if err := c.conn.WriteMessage(websocket.PingMessage, nil); err != nil {
				return
			}
		}
	}
}

func serveWs(hub *Hub, w http.ResponseWriter, r *http.Request) {
	conn, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // the upgrader has answered with an HTTP error
	}
	connections.Add(1)
	c := &Client{hub: hub, conn: conn, send: make(chan []byte, sendQueueSize), topics: make(map[string]struct{})}
	hub.register <- c
	go c.writePump()
	go func() {
		c.readPump()
		connections.Add(-1)
	}()
}

func serveHealth(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"status":"ok","connections":%d}`, connections.Load())
}

func main() {
	port := flag.Int("port", 8803, "TCP port on 127.0.0.1 (0 picks a free one)")
	flag.Parse()
	log.SetFlags(0)

	hub := newHub()
	go hub.run()

	mux := http.NewServeMux()
	mux.HandleFunc(wsPath, func(w http.ResponseWriter, r *http.Request) { serveWs(hub, w, r) })
	mux.HandleFunc("/health", serveHealth)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(*port)))
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
			log.Fatal(err)
		}
	}()
	fmt.Printf("listening on ws://%s:%d%s\n", host, ln.Addr().(*net.TCPAddr).Port, wsPath)
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	srv.Close() // closes the listener; hijacked WebSocket connections die with the process
	if n := dropped.Load(); n > 0 {
		fmt.Fprintf(os.Stderr, "dropped %d messages on full client queues\n", n)
	}
	os.Exit(0)
}
