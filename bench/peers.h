// Peer benchmarks: the systems `tracemesh bench --peers` compares tracemesh against, run on
// loopback in the same process run (see /work/shared/BENCH.md).
//
// Each run starts its own peer server (nats-server, mosquitto) from the Debian package on
// 127.0.0.1 with an ephemeral port in a fresh temp dir, drives it with the peer's own C client,
// and stops the server by pid before it returns. Raw ZeroMQ runs need no server. Every loop is
// bounded by the message count and by RunLimits::deadline; a run that hits the deadline
// returns what it measured so far, with the loss in `sent - received` and a note.
//
// Not safe to call concurrently (each run uses both cores anyway).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tracemesh/status.h"

namespace tracemesh::bench {

struct PeerResult {
  std::string system;    // e.g. "nats-server", "mosquitto qos1", "zmq proxy+curve"
  std::string workload;  // "fanin-1x1", "rtt" or "durable", as in BENCH.md
  // fanin: (received - 1) / (last arrival - first arrival), at the subscriber.
  // durable: acknowledged / (first publish .. last ack).  rtt: round trips / total time.
  double msgs_per_sec = 0;
  double p50_us = 0;  // rtt only, else 0
  double p99_us = 0;  // rtt only, else 0
  uint64_t sent = 0;
  uint64_t received = 0;  // durable: messages the server acknowledged (JetStream: stored)
  std::string note;       // settings that matter for reading the figure, and anything odd
};

struct RunLimits {
  std::chrono::milliseconds deadline{60000};  // for the whole run, server start included
  uint64_t warmup = 1000;                     // rtt: round trips before measuring
  size_t rtt_size = 128;                      // rtt: payload bytes
};

// Errors: not_found (server program missing: install its package with scripts/setup.sh),
// io (server did not start or a client call failed, with the client's message),
// invalid_argument (size 0 or count 0).

// nats-server core: 1 publisher connection -> nats-server -> 1 subscriber connection.
Result<PeerResult> run_nats_fanin(size_t size, uint64_t count, const RunLimits& limits = {});
// nats-server core: 1 publisher connection -> nats-server -> `subscribers` subscriber connections,
// each getting every message (fanout-1x8 with 8). msgs_per_sec counts deliveries, all subscribers
// together, from the first arrival anywhere to the last.
Result<PeerResult> run_nats_fanout(size_t size, uint64_t count, int subscribers, const RunLimits& limits = {});
// `hops` nats-servers, each a leaf node of the one above it: 1 publisher connection on the
// bottom server -> the chain -> 1 subscriber connection on the top one.
Result<PeerResult> run_nats_chain(size_t size, uint64_t count, int hops, const RunLimits& limits = {});
// nats-server core: 1 publisher cycling through `lines` x `sensors` subjects plant.lineL.sensorS ->
// 1 subscriber connection with `lines` wildcard subscriptions plant.lineL.* (each message matches
// one), delivered by one shared thread. The many-topics workload.
Result<PeerResult> run_nats_many_topics(size_t size, uint64_t count, int lines, int sensors,
                                        const RunLimits& limits = {});
// nats-server core request/reply (natsConnection_Request), one responder connection.
Result<PeerResult> run_nats_rtt(uint64_t count, const RunLimits& limits = {});
// JetStream file-storage stream, js_PublishAsync with at most 4,096 unacknowledged.
Result<PeerResult> run_jetstream_durable(size_t size, uint64_t count, const RunLimits& limits = {});
// mosquitto, publisher and subscriber at `qos` (0: workload fanin-1x1, 1: durable).
Result<PeerResult> run_mosquitto_fanin(size_t size, uint64_t count, int qos,
                                       const RunLimits& limits = {});
// ZeroMQ PUSH -> PULL, direct over tcp loopback.
Result<PeerResult> run_zmq_pushpull(size_t size, uint64_t count, const RunLimits& limits = {});
// ZeroMQ PUB -> `hops` XSUB/XPUB zmq::proxy threads in series -> SUB, each proxy with its own
// context (I/O thread), as a broker process would have; optionally CURVE on every hop. Lossless:
// PUB and XPUB block at the high-water mark (ZMQ_XPUB_NODROP). hops 1 is the one-hop floor of
// fanin-1x1; hops 4 the floor of chain-4.
Result<PeerResult> run_zmq_proxy(size_t size, uint64_t count, bool curve, int hops = 1,
                                 const RunLimits& limits = {});
// Raw TCP on loopback, no messaging system at all: a publisher thread writes `count` records of
// `message_bytes` in 256 KiB writes -> `hops` relay threads in series, each reading 256 KiB at a
// time and writing it on -> a subscriber thread. The kernel's share of any broker chain: the
// note gives each relay's CPU seconds per 1 M records (one receive and one send per record).
Result<PeerResult> run_tcp_relay(size_t message_bytes, uint64_t count, int hops, const RunLimits& limits = {});
// ZeroMQ DEALER -> ROUTER echo (a thread of this process) round trips.
Result<PeerResult> run_zmq_router_echo(uint64_t count, const RunLimits& limits = {});
// The same echo over ZeroMQ's ipc transport (a unix socket): the baseline of a local transport.
Result<PeerResult> run_zmq_router_echo_ipc(uint64_t count, const RunLimits& limits = {});
// Request/reply through a minimal ZeroMQ broker: requester DEALER -> ROUTER broker thread ->
// replier DEALER thread and back, each with its own context. The floor of `rtt` for any broker
// built on ZeroMQ: two network round trips where the direct echo has one.
Result<PeerResult> run_zmq_router_broker_rtt(uint64_t count, const RunLimits& limits = {});

// One line per peer, e.g. "nats-server v2.9.10", "mosquitto 2.0.11", "libzmq 4.3.4",
// "libnats 3.4.1", "libmosquitto 2.0.11"; "<name>: not installed" where missing.
std::vector<std::string> peer_versions();

}  // namespace tracemesh::bench
