// Command loadgen is the compiled load generator of bench/suite.py: it drives
// one WebSocket event server (tidings or a peer speaking the same protocol)
// through one scenario and prints one JSON object of results on stdout.
//
//	loadgen -url ws://127.0.0.1:PORT/ws -scenario fanout-max -server-pid PID
//
// Scenarios: fanout-max, fanout-rate, latency-100, many-topics, idle-10k, storm (see
// -help for the knobs; each scenario sets its own defaults). All sockets are
// served by one goroutine on one epoll instance (see loop.go); run it pinned
// to a CPU of its own (taskset -c 1) and read "loadgen_cpu_percent" in the
// output to see that it was not the bottleneck.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type options struct {
	url          string
	scenario     string
	serverPid    int
	subscribers  int
	duration     time.Duration
	rate         float64
	inflight     int
	topicRate    float64
	sharedRate   float64
	payloadBytes int
	sampleEvery  int
	concurrency  int
	connTimeout  time.Duration
	drainTimeout time.Duration
	settle       time.Duration
	idleSettle   time.Duration
	maxTime      time.Duration
	topic        string
	batchWait    time.Duration
	hotEvents    int64
	subURLs      string
	watchPids    string
	deflate      bool
	padText      bool
	sse          bool
	ssePath      string
	stormURL     string
	stormTopics  int
	stormJitter  time.Duration
	stormTimeout time.Duration
}

func main() {
	o := options{}
	flag.StringVar(&o.url, "url", "ws://127.0.0.1:8800/ws", "server WebSocket URL")
	flag.StringVar(&o.scenario, "scenario", "fanout-max", "fanout-max | fanout-rate | latency-100 | many-topics | idle-10k | storm")
	flag.IntVar(&o.serverPid, "server-pid", 0, "server PID, for its CPU time and RSS from /proc")
	flag.IntVar(&o.subscribers, "subscribers", 0, "subscriber connections (default per scenario: 1000, 1000, 100, 10000, 10000)")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "publishing time")
	flag.Float64Var(&o.rate, "rate", 0, "events/s offered, open loop (fanout-rate 1000, latency-100 100)")
	flag.IntVar(&o.inflight, "inflight", 64, "fanout-max: publishes awaiting their response")
	flag.Float64Var(&o.topicRate, "topic-rate", 2000, "many-topics: events/s cycling over the per-connection topics")
	flag.Float64Var(&o.sharedRate, "shared-rate", 5, "many-topics: events/s on the shared topic")
	flag.IntVar(&o.payloadBytes, "payload-bytes", 64, "padding in each event's payload")
	flag.BoolVar(&o.deflate, "deflate", false, "subscribers offer permessage-deflate (and require it), as browsers do")
	flag.BoolVar(&o.sse, "sse", false, "subscribers follow their topics over Server-Sent Events (GET -sse-path) instead of WebSocket")
	flag.StringVar(&o.ssePath, "sse-path", "/sse", "with -sse: the stream endpoint's path")
	flag.BoolVar(&o.padText, "pad-text", false, "padding of log-like text (compresses about as JSON events do) instead of one repeated letter")
	flag.IntVar(&o.sampleEvery, "sample-every", 1, "latency of 1 event in k per subscriber (1: every event)")
	flag.IntVar(&o.concurrency, "concurrency", 64, "handshakes in flight")
	flag.DurationVar(&o.connTimeout, "connect-timeout", 10*time.Second, "one handshake + subscribe")
	flag.DurationVar(&o.drainTimeout, "drain-timeout", 15*time.Second, "longest wait for the last events after publishing")
	flag.DurationVar(&o.settle, "settle", time.Second, "drain ends when no event arrived for this long")
	flag.DurationVar(&o.idleSettle, "idle-settle", 3*time.Second, "idle-10k: wait after connecting before reading RSS")
	flag.DurationVar(&o.maxTime, "max-time", 240*time.Second, "the whole run is abandoned after this long")
	flag.StringVar(&o.topic, "topic", "bench", "fan-out topic")
	flag.DurationVar(&o.batchWait, "batch-wait", 100*time.Microsecond, "pause between epoll rounds while the loop is hot (0: never)")
	flag.Int64Var(&o.hotEvents, "hot-events", 400, "events per 20 ms that make the loop hot (400 = 20,000 events/s)")
	flag.StringVar(&o.subURLs, "sub-urls", "", "comma-separated WebSocket URLs: subscriber i connects to the (i mod n)-th, the publisher still to -url (default: all to -url)")
	flag.StringVar(&o.watchPids, "watch-pids", "", "comma-separated PIDs of other processes (more nodes, a backplane) whose CPU each phase reports in watched_cpu_percent")
	flag.StringVar(&o.stormURL, "storm-url", "", "storm: where subscribers reconnect once -url dies (default: -url, a restarted node)")
	flag.IntVar(&o.stormTopics, "storm-topics", 100, "storm: topics the subscribers are spread over")
	flag.DurationVar(&o.stormJitter, "storm-jitter", 0, "storm: each subscriber waits a random delay up to this before reconnecting (0: all at once)")
	flag.DurationVar(&o.stormTimeout, "storm-timeout", 60*time.Second, "storm: a subscriber gives up resuming after this long")
	flag.IntVar(&dumpFrames, "dump-frames", 0, "print the first N text frames subscribers get to stderr (debugging)")
	printPad := flag.Int("print-pad", 0, "print the -pad-text padding of this many bytes and exit (for bench/wire_cost.py)")
	flag.Parse()
	if *printPad > 0 {
		fmt.Println(padding(*printPad, true))
		return
	}

	go func() {
		time.Sleep(o.maxTime)
		emit(map[string]any{"scenario": o.scenario, "error": fmt.Sprintf("abandoned after -max-time %s", o.maxTime)})
		os.Exit(2)
	}()

	run := run
	if o.scenario == "storm" {
		run = runStorm
	}
	res, err := run(o)
	if res == nil {
		res = map[string]any{}
	}
	res["scenario"] = o.scenario
	if err != nil {
		res["error"] = err.Error()
		emit(res)
		os.Exit(1)
	}
	emit(res)
}

func emit(v map[string]any) {
	out, err := json.Marshal(v)
	if err != nil {
		fmt.Printf("{\"error\":%q}\n", err.Error())
		return
	}
	os.Stdout.Write(append(out, '\n'))
}

func raiseNofile(want uint64) uint64 {
	var rl syscall.Rlimit
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	if rl.Max < want {
		nr := syscall.Rlimit{Cur: want, Max: want}
		if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &nr) == nil {
			return want
		}
	}
	if rl.Cur < rl.Max {
		rl.Cur = rl.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
	}
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	return rl.Cur
}

func run(o options) (map[string]any, error) {
	defaults := map[string]struct {
		subs int
		rate float64
	}{
		"fanout-max":  {1000, 0},
		"fanout-rate": {1000, 1000},
		"latency-100": {100, 100},
		"many-topics": {10000, 0},
		"idle-10k":    {10000, 0},
	}
	d, ok := defaults[o.scenario]
	if !ok {
		return nil, fmt.Errorf("unknown scenario %q", o.scenario)
	}
	if o.subscribers <= 0 {
		o.subscribers = d.subs
	}
	if o.rate <= 0 {
		o.rate = d.rate
	}
	u, err := url.Parse(o.url)
	if err != nil {
		return nil, err
	}
	addr, path := u.Host, u.RequestURI()
	// where the subscribers go: -url, or the -sub-urls round-robin
	subAddrs, subPaths := []string{addr}, []string{path}
	if strings.TrimSpace(o.subURLs) != "" {
		subAddrs, subPaths = nil, nil
		for _, raw := range strings.Split(o.subURLs, ",") {
			su, err := url.Parse(strings.TrimSpace(raw))
			if err != nil || su.Host == "" {
				return nil, fmt.Errorf("bad -sub-urls entry %q", raw)
			}
			subAddrs = append(subAddrs, su.Host)
			subPaths = append(subPaths, su.RequestURI())
		}
	}
	for _, raw := range strings.Split(o.watchPids, ",") {
		if raw = strings.TrimSpace(raw); raw != "" {
			pid, err := strconv.Atoi(raw)
			if err != nil || pid <= 0 {
				return nil, fmt.Errorf("bad -watch-pids entry %q", raw)
			}
			watchedPids = append(watchedPids, pid)
		}
	}

	nofile := raiseNofile(uint64(2*o.subscribers + 1000))
	res := map[string]any{
		"params": map[string]any{
			"url": o.url, "subscribers": o.subscribers, "duration_seconds": o.duration.Seconds(),
			"rate": o.rate, "inflight": o.inflight, "topic_rate": o.topicRate, "shared_rate": o.sharedRate,
			"payload_bytes": o.payloadBytes, "sample_every": o.sampleEvery, "concurrency": o.concurrency,
			"batch_wait_us": o.batchWait.Microseconds(), "hot_events_per_20ms": o.hotEvents,
			"sub_urls": o.subURLs, "watch_pids": o.watchPids, "deflate": o.deflate, "pad_text": o.padText, "sse": o.sse,
		},
		"loadgen": map[string]any{
			"gomaxprocs": runtime.GOMAXPROCS(0), "nofile": nofile, "go": runtime.Version(),
		},
	}

	deflateOn = o.deflate
	sseOn, ssePath = o.sse, o.ssePath
	l, err := newLoop(o.serverPid)
	if err == nil && o.deflate {
		l.inflater = newInflater()
	}
	if err != nil {
		return res, err
	}
	// every topic is known before the loop starts (the loop reads the table)
	topicsOf := func(i int) []string { return []string{o.topic} }
	switch o.scenario {
	case "many-topics":
		names := make([]string, o.subscribers)
		for i := range names {
			names[i] = "c" + itoa(int64(i))
			l.topicIndex(names[i])
		}
		l.topicIndex("shared")
		topicsOf = func(i int) []string { return []string{names[i], "shared"} }
	case "idle-10k":
		topicsOf = func(i int) []string { return []string{"idle"} }
		l.topicIndex("idle")
	default:
		l.topicIndex(o.topic)
	}
	l.batchWait, l.hotEvents = int64(o.batchWait), o.hotEvents
	if len(subAddrs) > 1 {
		l.groups = len(subAddrs)
	}
	go l.run()
	defer l.shutdown()

	rssFresh := rssBytes(o.serverPid)
	res["server_rss_fresh_bytes"] = rssFresh
	before := takeSnapshot(o.serverPid)
	conn := connectAll(l, subAddrs, subPaths, o, topicsOf)
	res["connect"] = conn
	connSnap := takeSnapshot(o.serverPid)
	res["connect"].(map[string]any)["cpu"] = cpuBetween(before, connSnap)
	if conn["connected"].(int) < o.subscribers {
		res["counters"] = l.counters()
		return res, fmt.Errorf("only %d of %d subscribers connected", conn["connected"], o.subscribers)
	}
	// wait until the loop has adopted every socket
	for t0 := time.Now(); atomic.LoadInt64(&l.registered) < int64(o.subscribers); {
		if time.Since(t0) > 5*time.Second {
			return res, errors.New("event loop did not adopt the subscribers")
		}
		time.Sleep(5 * time.Millisecond)
	}

	if o.scenario == "idle-10k" {
		time.Sleep(o.idleSettle)
		rss := rssBytes(o.serverPid)
		after := takeSnapshot(o.serverPid)
		res["server_rss_connected_bytes"] = rss
		if rss > 0 && rssFresh > 0 {
			res["rss_per_connection_bytes"] = float64(rss-rssFresh) / float64(o.subscribers)
		}
		res["cpu_idle_settle"] = cpuBetween(connSnap, after)
		res["health"] = health(addr)
		l.shutdown()
		res["counters"] = l.counters()
		return res, nil
	}
	res["server_rss_subscribed_bytes"] = rssBytes(o.serverPid)
	time.Sleep(300 * time.Millisecond) // let the server finish its subscribe work

	pc, err := dialWS(addr, path, o.connTimeout)
	if err != nil {
		return res, fmt.Errorf("publisher: %w", err)
	}
	fd, err := pc.detach()
	if err != nil {
		return res, fmt.Errorf("publisher: %w", err)
	}
	if err := l.attachPub(fd, pc.buf); err != nil {
		return res, fmt.Errorf("publisher: %w", err)
	}

	pl := &plan{
		duration:     o.duration,
		inflight:     o.inflight,
		pad:          padding(o.payloadBytes, o.padText),
		drainTimeout: o.drainTimeout,
		settle:       o.settle,
		sampleEvery:  int64(o.sampleEvery),
	}
	switch o.scenario {
	case "fanout-max":
		pl.mode = "max"
	case "fanout-rate", "latency-100":
		pl.mode = "rate"
		pl.streams = []*stream{{interval: int64(1e9 / o.rate), topicOf: func(int64) int { return 0 }}}
	case "many-topics":
		pl.mode = "rate"
		n := int64(o.subscribers)
		shared := int(n)
		if o.topicRate > 0 {
			pl.streams = append(pl.streams, &stream{interval: int64(1e9 / o.topicRate), topicOf: func(k int64) int { return int(k % n) }})
		}
		if o.sharedRate > 0 {
			pl.streams = append(pl.streams, &stream{interval: int64(1e9 / o.sharedRate), topicOf: func(int64) int { return shared }})
		}
	}
	l.planCh <- pl
	select {
	case r := <-l.result:
		res["phase"] = r
	case <-time.After(o.duration + o.drainTimeout + 10*time.Second):
		l.shutdown()
		res["counters"] = l.counters()
		return res, errors.New("phase did not finish in time")
	}
	l.shutdown()
	res["counters"] = l.counters()
	res["health"] = health(addr)
	return res, nil
}

// connectAll opens o.subscribers connections, at most o.concurrency
// handshakes at a time, subscribes each to topicsOf(i) and hands the socket
// to the loop. A failed attempt is retried twice.
func connectAll(l *loop, addrs, paths []string, o options, topicsOf func(int) []string) map[string]any {
	t0 := time.Now()
	var mu sync.Mutex
	failures := map[string]int{}
	var connected, failed int64
	jobs := make(chan int, o.subscribers)
	for i := 0; i < o.subscribers; i++ {
		jobs <- i
	}
	close(jobs)
	var wg sync.WaitGroup
	deadline := t0.Add(120 * time.Second)
	for w := 0; w < o.concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				// give up early when the server refuses nearly everything
				if f := atomic.LoadInt64(&failed); f > 300 && f > 3*atomic.LoadInt64(&connected) {
					mu.Lock()
					failures["not tried: too many failures"]++
					mu.Unlock()
					continue
				}
				if time.Now().After(deadline) {
					mu.Lock()
					failures["connect phase over 120 s"]++
					mu.Unlock()
					continue
				}
				for attempt := 0; attempt < 3; attempt++ {
					g := i % len(addrs)
					s, err := subscribeOne(l, addrs[g], paths[g], o.connTimeout, topicsOf(i))
					if err == nil {
						s.group = g
						atomic.AddInt64(&connected, 1)
						l.newSubs <- s
						break
					}
					atomic.AddInt64(&failed, 1)
					mu.Lock()
					failures[reason(err)]++
					mu.Unlock()
					time.Sleep(time.Duration(50*(attempt+1)) * time.Millisecond)
				}
			}
		}()
	}
	wg.Wait()
	keys := make([]string, 0, len(failures))
	for k := range failures {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	fl := map[string]int{}
	for _, k := range keys {
		fl[k] = failures[k]
	}
	return map[string]any{
		"connected":       int(connected),
		"seconds":         round(time.Since(t0).Seconds(), 3),
		"failed_attempts": fl,
	}
}

func reason(err error) string {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	s := err.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 && !strings.HasPrefix(s, "upgrade refused") {
		s = s[i+2:]
	}
	if len(s) > 80 {
		s = s[:80]
	}
	return s
}

// padding is an event's filler: one letter repeated, or log-like text that
// compresses about as real JSON events do (about 2.5 times with deflate).
func padding(n int, text bool) string {
	if !text {
		return strings.Repeat("x", n)
	}
	words := []string{"pulled", "layer", "in", "step", "build", "cache", "miss", "image", "pushed", "ok", "from"}
	var b strings.Builder
	state := uint32(2463534242)
	for b.Len() < n {
		state ^= state << 13
		state ^= state >> 17
		state ^= state << 5
		switch state % 4 {
		case 0:
			fmt.Fprintf(&b, "sha256:%08x ", state*2654435761)
		case 1:
			fmt.Fprintf(&b, "%d.%ds ", state%97, state%10)
		default:
			b.WriteString(words[state%uint32(len(words))])
			b.WriteByte(' ')
		}
	}
	return b.String()[:n]
}

func subscribeOne(l *loop, addr, path string, timeout time.Duration, topics []string) (*sub, error) {
	if sseOn {
		return subscribeSSE(l, addr, timeout, topics)
	}
	c, err := dialWSExt(addr, path, timeout, deflateOn)
	if err != nil {
		return nil, err
	}
	var frames []byte
	for k, t := range topics {
		msg := `{"type":"subscribe","topic":"` + t + `","requestId":` + itoa(int64(k+1)) + `}`
		frames = maskFrame(frames, opText, []byte(msg), maskKey())
	}
	if _, err := c.c.Write(frames); err != nil {
		c.c.Close()
		return nil, err
	}
	pending := len(topics)
	for pending > 0 {
		op, p, err := c.readFrame()
		if err != nil {
			c.c.Close()
			return nil, err
		}
		if op != opText {
			continue
		}
		var r reply
		if err := json.Unmarshal(p, &r); err != nil {
			c.c.Close()
			return nil, fmt.Errorf("bad reply: %v", err)
		}
		if r.Type == "event" {
			continue
		}
		var rp replyPayload
		_ = json.Unmarshal(r.Payload, &rp)
		if r.Type != "response" || rp.Status != "subscribed" {
			c.c.Close()
			s := string(p)
			if len(s) > 200 {
				s = s[:200]
			}
			return nil, fmt.Errorf("subscribe refused: %s", s)
		}
		pending--
	}
	fd, err := c.detach()
	if err != nil {
		return nil, err
	}
	s := &sub{fd: fd, nt: len(topics), partial: c.buf}
	for k, t := range topics {
		s.tname[k] = []byte(t)
		s.tidx[k] = l.topicByNm[t]
	}
	return s, nil
}

func subscribeSSE(l *loop, addr string, timeout time.Duration, topics []string) (*sub, error) {
	c, rest, err := dialSSE(addr, topics, timeout)
	if err != nil {
		return nil, err
	}
	sc := &setupConn{c: c}
	fd, err := sc.detach()
	if err != nil {
		return nil, err
	}
	s := &sub{fd: fd, nt: len(topics), partial: rest, sse: true}
	for k, t := range topics {
		s.tname[k] = []byte(t)
		s.tidx[k] = l.topicByNm[t]
	}
	return s, nil
}

func health(addr string) any {
	cl := http.Client{Timeout: 5 * time.Second}
	resp, err := cl.Get("http://" + addr + "/health")
	if err != nil {
		return map[string]any{"error": err.Error()}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	var v any
	if json.Unmarshal(body, &v) != nil {
		return map[string]any{"status": resp.StatusCode, "body": string(body)}
	}
	return map[string]any{"status": resp.StatusCode, "body": v}
}
