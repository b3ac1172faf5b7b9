package main

// The storm scenario (bench/storm.py): N subscribers on one node, each on one
// of K topics, reading events and keeping the last seq and epoch; when the
// node dies under them, every subscriber reconnects at once (or spread over
// -storm-jitter) to -storm-url and resubscribes with since/epoch. It reports,
// per subscriber, how long it took from the first lost connection to the
// subscribe reply on the new node (and to the end of the replay), whether the
// reply said recovered, every refusal with its reason, and every gap or
// duplicate in the seq stream across the move.
//
// Unlike the other scenarios it uses one goroutine per connection (Go's own
// poller): what is measured is the server's storm, not the delivery rate, and
// the code stays short. It talks to bench/storm.py over stdio:
//
//	stdout "ready N"            every subscriber is subscribed on -url
//	stdout "lost"               the first connection was lost (the kill)
//	stdout "resumed N"          every subscriber resumed (or -storm-timeout passed)
//	stdin  "stop"               the publisher stopped: settle, then report
//	stdout {JSON}               the results, last line

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/url"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// stormClient is one subscriber's record, written by its own goroutine only
// (read by the reporter once every goroutine has stopped).
type stormClient struct {
	idx      int
	topic    string
	epoch    string
	last     int64 // last seq seen (or the subscribe reply's position)
	events   int64 // events received, before and after the move
	gaps     int64 // seqs missing in the stream
	dups     int64 // seqs at or below the last one
	epochChg int64 // events of another epoch than the one resumed

	lostNs      int64 // when the first connection broke
	resumedNs   int64 // when the resume reply arrived
	caughtUpNs  int64 // when the replay was done (last >= the reply's position)
	headAtReply int64
	recovered   *bool
	replayed    int64
	attempts    int
	refusals    map[string]int
	failed      string // why it never resumed
	gapSeen     []string
}

type frameMsg struct {
	Type      string          `json:"type"`
	Topic     string          `json:"topic"`
	Seq       *int64          `json:"seq"`
	Epoch     string          `json:"epoch"`
	RequestID json.RawMessage `json:"requestId"`
	Payload   json.RawMessage `json:"payload"`
}

type subReply struct {
	Status    string `json:"status"`
	Seq       int64  `json:"seq"`
	Epoch     string `json:"epoch"`
	Recovered *bool  `json:"recovered"`
	Replayed  int64  `json:"replayed"`
	Code      string `json:"code"`
	Message   string `json:"message"`
}

// wsConn is a blocking client connection after the upgrade.
type wsConn struct {
	c  net.Conn
	br *bufio.Reader
}

func stormDial(addr, path string, timeout time.Duration) (*wsConn, error) {
	sc, err := dialWS(addr, path, timeout)
	if err != nil {
		return nil, err
	}
	_ = sc.c.SetDeadline(time.Time{})
	return &wsConn{c: sc.c, br: bufio.NewReaderSize(io.MultiReader(bytes.NewReader(sc.buf), sc.c), 4096)}, nil
}

// next returns the next text frame's payload, answering pings.
func (w *wsConn) next() ([]byte, error) {
	for {
		var h [2]byte
		if _, err := io.ReadFull(w.br, h[:]); err != nil {
			return nil, err
		}
		if h[1]&0x80 != 0 || h[0]&0x70 != 0 {
			return nil, errors.New("bad frame header")
		}
		n := uint64(h[1] & 0x7f)
		switch n {
		case 126:
			var l [2]byte
			if _, err := io.ReadFull(w.br, l[:]); err != nil {
				return nil, err
			}
			n = uint64(binary.BigEndian.Uint16(l[:]))
		case 127:
			var l [8]byte
			if _, err := io.ReadFull(w.br, l[:]); err != nil {
				return nil, err
			}
			n = binary.BigEndian.Uint64(l[:])
			if n > 1<<24 {
				return nil, errors.New("frame too large")
			}
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(w.br, p); err != nil {
			return nil, err
		}
		switch h[0] & 0x0f {
		case opText:
			return p, nil
		case opPing:
			if _, err := w.c.Write(maskFrame(nil, opPong, p, maskKey())); err != nil {
				return nil, err
			}
		case opClose:
			code, reason := closeOf(p)
			return nil, fmt.Errorf("closed by the server: %d %s", code, reason)
		}
	}
}

func closeOf(p []byte) (int, string) {
	if len(p) < 2 {
		return 1005, ""
	}
	return int(binary.BigEndian.Uint16(p[:2])), string(p[2:])
}

// refusalReason names why a reconnect attempt failed, in few classes.
func refusalReason(err error) string {
	s := err.Error()
	switch {
	case strings.HasPrefix(s, "upgrade refused: "):
		return strings.Trim(strings.TrimPrefix(s, "upgrade refused: "), `"`)
	case strings.HasPrefix(s, "subscribe refused: "), strings.HasPrefix(s, "closed by the server"):
		return s
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "closed before the upgrade was answered"
	case strings.Contains(s, "connection reset"):
		return "connection reset before the upgrade was answered"
	case strings.Contains(s, "connection refused"):
		return "connection refused (nothing listening)"
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	return reason(err)
}

// subscribeOn sends one subscribe (resuming when since >= 0) and returns its reply.
func (w *wsConn) subscribeOn(c *stormClient, since int64, epoch string, timeout time.Duration) (*subReply, error) {
	msg := `{"type":"subscribe","topic":"` + c.topic + `","requestId":"s"`
	if since >= 0 {
		msg += `,"payload":{"since":` + itoa(since) + `,"epoch":"` + epoch + `"}`
	}
	msg += `}`
	_ = w.c.SetDeadline(time.Now().Add(timeout))
	defer w.c.SetDeadline(time.Time{})
	if _, err := w.c.Write(maskFrame(nil, opText, []byte(msg), maskKey())); err != nil {
		return nil, err
	}
	for {
		p, err := w.next()
		if err != nil {
			return nil, err
		}
		var f frameMsg
		if err := json.Unmarshal(p, &f); err != nil {
			return nil, fmt.Errorf("bad frame: %v", err)
		}
		if f.Type == "event" {
			// the reply comes first: an event before it is a protocol violation
			return nil, errors.New("subscribe refused: event before the reply")
		}
		if string(f.RequestID) != `"s"` {
			continue
		}
		var r subReply
		_ = json.Unmarshal(f.Payload, &r)
		if f.Type != "response" || r.Status != "subscribed" {
			return nil, fmt.Errorf("subscribe refused: %s %s", r.Code, r.Message)
		}
		return &r, nil
	}
}

// onEvent checks one event frame against the stream so far.
func (c *stormClient) onEvent(f *frameMsg) {
	if f.Seq == nil {
		return
	}
	seq := *f.Seq
	c.events++
	if f.Epoch != c.epoch {
		c.epochChg++
		c.epoch, c.last = f.Epoch, seq
		return
	}
	switch {
	case seq <= c.last:
		c.dups++
	case seq > c.last+1:
		c.gaps += seq - c.last - 1
		if len(c.gapSeen) < 4 {
			// where: before the move, in the replay (up to the reply's position), or live after it
			where := "before the move"
			if c.resumedNs != 0 {
				where = "live after the replay"
				if seq <= c.headAtReply {
					where = "in the replay"
				}
			}
			c.gapSeen = append(c.gapSeen, fmt.Sprintf("%s: after %d got %d (%s; reply at %d, replayed %d)",
				c.topic, c.last, seq, where, c.headAtReply, c.replayed))
		}
		c.last = seq
	default:
		c.last = seq
	}
}

// read consumes events until the connection ends; the error says how.
func (c *stormClient) read(w *wsConn, onCaughtUp func()) error {
	for {
		p, err := w.next()
		if err != nil {
			return err
		}
		if !isEvent(p) {
			continue
		}
		var f frameMsg
		if json.Unmarshal(p, &f) != nil {
			continue
		}
		c.onEvent(&f)
		if c.caughtUpNs == 0 && c.resumedNs != 0 && c.last >= c.headAtReply {
			c.caughtUpNs = time.Now().UnixNano()
			onCaughtUp()
		}
	}
}

type stormOpts struct {
	addr, path           string
	stormAddr, stormPath string
	clients, topics      int
	concurrency          int
	jitter               time.Duration
	timeout              time.Duration
	connTimeout          time.Duration
	settle               time.Duration
}

func parseStormURL(raw string) (string, string, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || (u.Scheme != "ws" && u.Scheme != "http") {
		return "", "", fmt.Errorf("bad WebSocket URL %q", raw)
	}
	return u.Host, u.RequestURI(), nil
}

func runStorm(o options) (map[string]any, error) {
	so := stormOpts{clients: o.subscribers, topics: o.stormTopics, concurrency: o.concurrency,
		jitter: o.stormJitter, timeout: o.stormTimeout, connTimeout: o.connTimeout, settle: o.settle}
	if so.clients <= 0 {
		so.clients = 10000
	}
	if so.topics <= 0 {
		so.topics = 100
	}
	var err error
	if so.addr, so.path, err = parseStormURL(o.url); err != nil {
		return nil, err
	}
	if o.stormURL == "" {
		o.stormURL = o.url
	}
	if so.stormAddr, so.stormPath, err = parseStormURL(o.stormURL); err != nil {
		return nil, err
	}
	nofile := raiseNofile(uint64(so.clients + 1000))
	res := map[string]any{
		"params": map[string]any{
			"url": o.url, "storm_url": o.stormURL, "clients": so.clients, "topics": so.topics,
			"concurrency": so.concurrency, "jitter_ms": so.jitter.Milliseconds(),
			"storm_timeout_seconds": so.timeout.Seconds(),
		},
		"loadgen": map[string]any{"nofile": nofile},
	}
	rand.Seed(time.Now().UnixNano())
	clients := make([]*stormClient, so.clients)
	for i := range clients {
		clients[i] = &stormClient{idx: i, topic: fmt.Sprintf("storm%d", i%so.topics), refusals: map[string]int{}}
	}

	// 1. connect and subscribe everyone to the first node, so many at a time
	t0 := time.Now()
	conns := make([]*wsConn, so.clients)
	var failures sync.Map
	var wg sync.WaitGroup
	jobs := make(chan int)
	for k := 0; k < so.concurrency; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				c := clients[i]
				for attempt := 0; attempt < 3; attempt++ {
					w, err := stormDial(so.addr, so.path, so.connTimeout)
					if err == nil {
						var r *subReply
						if r, err = w.subscribeOn(c, -1, "", so.connTimeout); err == nil {
							c.last, c.epoch = r.Seq, r.Epoch
							conns[i] = w
							break
						}
						w.c.Close()
					}
					n, _ := failures.LoadOrStore(refusalReason(err), new(int64))
					atomic.AddInt64(n.(*int64), 1)
					time.Sleep(time.Duration(50*(attempt+1)) * time.Millisecond)
				}
			}
		}()
	}
	for i := range clients {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	connectFailures := map[string]int64{}
	failures.Range(func(k, v any) bool { connectFailures[k.(string)] = *v.(*int64); return true })
	connected := 0
	for _, w := range conns {
		if w != nil {
			connected++
		}
	}
	res["connect"] = map[string]any{"connected": connected, "seconds": round(time.Since(t0).Seconds(), 3),
		"failed_attempts": connectFailures}
	if connected < so.clients {
		for _, w := range conns {
			if w != nil {
				w.c.Close()
			}
		}
		return res, fmt.Errorf("only %d of %d subscribers connected", connected, so.clients)
	}

	// 2. read until the node dies, then come back on the other one
	var firstLost int64
	var lostOnce, allResumed, allCaughtUp sync.Once
	var resumed, caughtUp, gaveUp int64
	resumedCh := make(chan struct{})
	stopCh := make(chan struct{})
	finished := make(chan struct{})
	var stopOnce sync.Once
	stop := func() { stopOnce.Do(func() { close(stopCh) }) }
	var caughtUpAllNs int64
	live := make([]*wsConn, so.clients)
	var liveMu sync.Mutex
	checkResumed := func() {
		if atomic.LoadInt64(&resumed)+atomic.LoadInt64(&gaveUp) == int64(so.clients) {
			allResumed.Do(func() { close(resumedCh) })
		}
	}
	onCaughtUp := func() {
		if atomic.AddInt64(&caughtUp, 1) == int64(so.clients) {
			allCaughtUp.Do(func() { atomic.StoreInt64(&caughtUpAllNs, time.Now().UnixNano()) })
		}
	}
	var running sync.WaitGroup
	fmt.Printf("ready %d\n", so.clients)
	for i := range clients {
		running.Add(1)
		go func(c *stormClient, w *wsConn) {
			defer running.Done()
			err := c.read(w, onCaughtUp)
			w.c.Close()
			select {
			case <-stopCh:
				return // the run is over: not a loss
			default:
			}
			now := time.Now().UnixNano()
			c.lostNs = now
			lostOnce.Do(func() {
				atomic.StoreInt64(&firstLost, now)
				fmt.Println("lost")
			})
			_ = err
			if so.jitter > 0 {
				time.Sleep(time.Duration(rand.Int63n(int64(so.jitter))))
			}
			giveUp := time.Now().Add(so.timeout)
			for {
				c.attempts++
				w2, err := stormDial(so.stormAddr, so.stormPath, so.connTimeout)
				var r *subReply
				if err == nil {
					r, err = w2.subscribeOn(c, c.last, c.epoch, so.connTimeout)
					if err != nil {
						w2.c.Close()
					}
				}
				if err == nil {
					c.resumedNs = time.Now().UnixNano()
					c.recovered, c.replayed, c.headAtReply = r.Recovered, r.Replayed, r.Seq
					if r.Epoch != c.epoch {
						c.epochChg++
					}
					liveMu.Lock()
					live[c.idx] = w2
					liveMu.Unlock()
					atomic.AddInt64(&resumed, 1)
					checkResumed()
					if c.last >= c.headAtReply {
						c.caughtUpNs = c.resumedNs
						onCaughtUp()
					}
					_ = c.read(w2, onCaughtUp)
					w2.c.Close()
					return
				}
				c.refusals[refusalReason(err)]++
				if time.Now().After(giveUp) {
					c.failed = refusalReason(err)
					atomic.AddInt64(&gaveUp, 1)
					checkResumed()
					return
				}
				select {
				case <-stopCh:
					c.failed = "run stopped first"
					return
				default:
				}
				// a refused attempt waits a little (50 ms doubling to 1 s, +-50%)
				back := 50 * time.Millisecond << uint(minInt(c.attempts-1, 4))
				time.Sleep(back/2 + time.Duration(rand.Int63n(int64(back))))
			}
		}(clients[i], conns[i])
	}

	// stdin: "stop" ends the run (bench/storm.py stopped publishing)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			if strings.TrimSpace(sc.Text()) == "stop" {
				break
			}
		}
		stop()
	}()
	go func() {
		select {
		case <-resumedCh:
			fmt.Printf("resumed %d\n", atomic.LoadInt64(&resumed))
		case <-stopCh:
		}
	}()
	<-stopCh
	// let the last events arrive, then close everything
	time.Sleep(so.settle)
	liveMu.Lock()
	for _, w := range live {
		if w != nil {
			w.c.Close()
		}
	}
	liveMu.Unlock()
	go func() { running.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(10 * time.Second):
		res["warning"] = "some subscriber goroutines did not stop within 10 s"
	}
	res["storm"] = stormReport(clients, atomic.LoadInt64(&firstLost), atomic.LoadInt64(&caughtUpAllNs))
	return res, nil
}

func minInt(a, b int) int {
	if a < b {
		return a
	}
	return b
}

func stormReport(clients []*stormClient, firstLost, caughtUpAll int64) map[string]any {
	resumeH, caughtH := newHist(), newHist()
	var lastResumed, lastLost int64
	recTrue, recFalse, recMissing, resumedN, failedN := 0, 0, 0, 0, 0
	var gaps, dups, epochChg, events, replayed int64
	clientsWithGap, attemptsMax := 0, 0
	refusals := map[string]int{}
	var gapSamples []string
	failed := map[string]int{}
	attemptsHist := map[string]int{}
	lastByTopic := map[string][2]int64{} // min, max last seq
	for _, c := range clients {
		events += c.events
		gaps += c.gaps
		dups += c.dups
		epochChg += c.epochChg
		if c.gaps > 0 || c.dups > 0 {
			clientsWithGap++
			for _, g := range c.gapSeen {
				if len(gapSamples) < 30 {
					gapSamples = append(gapSamples, g)
				}
			}
		}
		for k, v := range c.refusals {
			refusals[k] += v
		}
		if c.lostNs > lastLost {
			lastLost = c.lostNs
		}
		if c.attempts > attemptsMax {
			attemptsMax = c.attempts
		}
		attemptsHist[itoa(int64(c.attempts))]++
		if c.resumedNs == 0 {
			failedN++
			why := c.failed
			if why == "" {
				why = "never lost its connection"
			}
			failed[why]++
			continue
		}
		resumedN++
		replayed += c.replayed
		resumeH.add(c.resumedNs - firstLost)
		if c.resumedNs > lastResumed {
			lastResumed = c.resumedNs
		}
		if c.caughtUpNs > 0 {
			caughtH.add(c.caughtUpNs - firstLost)
		}
		switch {
		case c.recovered == nil:
			recMissing++
		case *c.recovered:
			recTrue++
		default:
			recFalse++
		}
		mm, ok := lastByTopic[c.topic]
		if !ok {
			mm = [2]int64{c.last, c.last}
		}
		if c.last < mm[0] {
			mm[0] = c.last
		}
		if c.last > mm[1] {
			mm[1] = c.last
		}
		lastByTopic[c.topic] = mm
	}
	// a subscriber behind the most advanced one of its topic at the end
	var behind, behindEvents int64
	for _, c := range clients {
		if c.resumedNs == 0 {
			continue
		}
		if mm := lastByTopic[c.topic]; c.last < mm[1] {
			behind++
			behindEvents += mm[1] - c.last
		}
	}
	topics := make([]string, 0, len(lastByTopic))
	for t := range lastByTopic {
		topics = append(topics, t)
	}
	sort.Strings(topics)
	finalSeq := map[string]int64{}
	for _, t := range topics {
		finalSeq[t] = lastByTopic[t][1]
	}
	out := map[string]any{
		"first_lost_unix_ns":           firstLost,
		"last_lost_unix_ns":            lastLost,
		"lost_spread_ms":               round(float64(lastLost-firstLost)/1e6, 3),
		"resumed":                      resumedN,
		"not_resumed":                  failedN,
		"not_resumed_why":              failed,
		"recovered_true":               recTrue,
		"recovered_false":              recFalse,
		"recovered_missing":            recMissing,
		"refusals":                     refusals,
		"attempts_max":                 attemptsMax,
		"attempts":                     attemptsHist,
		"gaps":                         gaps,
		"duplicates":                   dups,
		"clients_with_gap_or_dup":      clientsWithGap,
		"epoch_changes":                epochChg,
		"events":                       events,
		"replayed":                     replayed,
		"behind_at_end":                behind,
		"behind_at_end_events":         behindEvents,
		"resume_ms":                    resumeH.summary(),
		"caught_up_ms":                 caughtH.summary(),
		"final_seq_by_topic":           finalSeq,
		"all_resumed_after_first_ms":   nil,
		"all_caught_up_after_first_ms": nil,
	}
	if resumedN == len(clients) && firstLost > 0 {
		out["all_resumed_unix_ns"] = lastResumed
		out["all_resumed_after_first_ms"] = round(float64(lastResumed-firstLost)/1e6, 3)
	}
	if caughtUpAll > 0 && firstLost > 0 {
		out["all_caught_up_unix_ns"] = caughtUpAll
		out["all_caught_up_after_first_ms"] = round(float64(caughtUpAll-firstLost)/1e6, 3)
	}
	return out
}
