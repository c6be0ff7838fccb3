@0x8b00e08a5c0c4f61;
# Control frames between a client (or peer broker) and a broker.
#
# On the wire every frame is one ZeroMQ message of one or two parts:
#   part 1: a Frame (this schema), Cap'n Proto stream framing;
#   part 2: present only for `publish` and `deliver`: `count` Envelope messages
#           (envelope.capnp) back to back, each in Cap'n Proto stream framing.
# A receiver checks `version` first and rejects a frame whose version it does
# not speak, with an `error` frame naming both versions.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("tracemesh::wire");

using Env = import "envelope.capnp";

const protocolVersion :UInt16 = 2;  # 2: Deliver.runs; envelopes may omit trailing null pointers

enum ErrorCode {
  none @0;
  protocolMismatch @1;    # peer speaks another protocol version
  malformed @2;           # frame could not be decoded
  unauthenticated @3;     # no, invalid, forged or expired credential
  revoked @4;             # credential has been revoked
  permissionDenied @5;    # authenticated but not allowed
  noResponders @6;        # a request matched no subscriber
  notFound @7;            # stream or consumer does not exist
  storageFull @8;         # the broker cannot persist more data
  overloaded @9;          # slow down and retry
  invalidArgument @10;
  internal @11;
  exists @12;
  tooLarge @13;           # message exceeds the broker's max_message_bytes
  noSession @14;          # the broker has no session for this connection: send hello
}

struct Hello {
  credential @0 :Data;     # a SignedCredential (credential.capnp), serialized
  nonce @1 :Data;          # 16 random bytes chosen by the client
  timestampMs @2 :Int64;   # client wall clock
  signature @3 :Data;      # Ed25519 over "tracemesh-hello-v1" | brokerKey | nonce | timestampMs(le64)
  clientName @4 :Text;
  # Federation: set when a broker dials another broker over a [[link]].
  link @5 :Bool;
  tier @6 :Text;
  site @7 :Text;
  region @8 :Text;
}

struct HelloOk {
  brokerName @0 :Text;
  brokerKey @1 :Data;      # the broker's Ed25519 public key
  maxMessageBytes @2 :UInt32;
  inbox @3 :Text;          # the inbox prefix this client may subscribe to for replies
  tier @4 :Text;
  site @5 :Text;
  region @6 :Text;
}

struct Forward {
  # Envelopes a broker forwards over a link (part 2, as for publish). Link
  # sequence numbers are per link and direction; the receiver acks with
  # forwardAck = the highest sequence it has taken responsibility for.
  firstSeq @0 :UInt64;
  count @1 :UInt32;
}

struct InterestEntry {
  filter @0 :Text;
  queueGroup @1 :Text;
}

struct Interest {
  # Subscription interest a broker advertises to a linked broker.
  add @0 :List(InterestEntry);
  remove @1 :List(InterestEntry);
  reset @2 :Bool;          # forget everything advertised before, then apply `add`
}

struct LinkStatus {
  name @0 :Text;
  peer @1 :Text;           # the remote broker's name
  peerTier @2 :Text;
  peerSite @3 :Text;
  direction @4 :Text;      # "dialed" (this broker connects) or "accepted"
  endpoint @5 :Text;
  state @6 :Text;          # connecting | handshaking | up | down | refused
  backlogMessages @7 :UInt64;
  backlogBytes @8 :UInt64;
  dropped @9 :UInt64;
  rttUs @10 :UInt64;       # last measured round trip; 0 = not measured yet
  msgsPerSec @11 :Float64; # forwarded, over the last seconds
  bytesPerSec @12 :Float64;
  forwarded @13 :UInt64;
  received @14 :UInt64;
  lastError @15 :Text;
  interest @16 :List(Text);      # what this broker advertises to the peer, collapsed
                                 # (no filter another of its queue group covers):
                                 # "filter" or "filter (group g)"
  peerInterest @17 :List(Text);  # what the peer told this broker it wants, same form
  security @18 :Text;            # what protects the link's bytes: "CURVE", the cipher of an
                                 # encrypted native link, "local (unix)", "none (curve = false)" ...
}

struct MeshStatus {
  broker @0 :Text;
  tier @1 :Text;
  site @2 :Text;
  region @3 :Text;
  links @4 :List(LinkStatus);
  duplicatesDropped @5 :UInt64;
  loopsCut @6 :UInt64;     # forwards not made: the next broker was on the message's visited path
}

struct Error {
  code @0 :ErrorCode;
  message @1 :Text;
  correlation @2 :UInt64;  # the admin request or ping this answers, or 0
  messageId @3 :Env.MessageId;  # the message this is about (requests, publishes), if any
}

struct Publish {
  count @0 :UInt32;        # envelopes in part 2
}

struct Delivery {
  subscription @0 :UInt64; # client-chosen subscription id the envelope matched
  streamSeq @1 :UInt64;    # durable consumers: stream sequence (ack with it); else 0
  attempt @2 :UInt32;      # durable consumers: delivery attempt, 1 = first
}

struct DeliveryRun {
  subscription @0 :UInt64;    # client-chosen subscription id the envelopes matched
  count @1 :UInt32;           # this many consecutive envelopes of part 2
  attempt @2 :UInt32;         # durable consumers: delivery attempt of each, 1 = first; else 0
  firstStreamSeq @3 :UInt64;  # durable consumers: stream sequence of the first, the next +1 each;
                              # 0 = best-effort (every envelope's is 0)
}

struct Deliver {
  # What each envelope of part 2 is delivered for, in order: one run per stretch of envelopes
  # with one subscription and attempt and (durable consumers) consecutive stream sequences.
  deliveries @0 :List(Delivery);  # protocol 1 (one per envelope); always empty in protocol 2
  runs @1 :List(DeliveryRun);     # 24 bytes per run instead of 24 per message
}

struct Subscribe {
  subscription @0 :UInt64;
  pattern @1 :Text;        # topic filter, MQTT wildcards + and #
  queueGroup @2 :Text;     # empty = every subscriber gets every message
  # Durable consumer (pattern ignored when stream is set):
  stream @3 :Text;
  consumer @4 :Text;       # durable name; offset survives restarts
  maxInFlight @5 :UInt32;  # unacked deliveries allowed; 0 = broker default
  ackWaitMs @6 :UInt32;    # redeliver after this long unacked; 0 = broker default
  deliverFrom @7 :DeliverFrom;
  enum DeliverFrom { all @0; new @1; }
}

struct Unsubscribe {
  subscription @0 :UInt64;
}

struct PublishAck {
  id @0 :Env.MessageId;
  streamSeq @1 :UInt64;
  error @2 :ErrorCode;     # none = committed to disk
  duplicate @3 :Bool;      # already stored earlier (dedup window); streamSeq is the original
}

struct PublishAcks {
  acks @0 :List(PublishAck);
}

struct ConsumerAck {
  subscription @0 :UInt64;
  streamSeqs @1 :List(UInt64);
}

struct StreamConfig {
  name @0 :Text;
  subjects @1 :List(Text);   # topic filters whose messages the stream stores
  maxMessages @2 :UInt64;    # 0 = unlimited
  maxBytes @3 :UInt64;       # 0 = unlimited
  maxAgeMs @4 :UInt64;       # 0 = unlimited
}

struct StreamInfo {
  config @0 :StreamConfig;
  messages @1 :UInt64;
  bytes @2 :UInt64;
  firstSeq @3 :UInt64;
  lastSeq @4 :UInt64;
  consumers @5 :List(ConsumerInfo);
}

struct ConsumerInfo {
  name @0 :Text;
  ackFloor @1 :UInt64;       # every seq <= ackFloor is acknowledged
  pending @2 :UInt64;        # delivered, not yet acked
  redelivered @3 :UInt64;
}

struct AdminRequest {
  correlation @0 :UInt64;
  union {
    streamCreate @1 :StreamConfig;
    streamList @2 :Void;
    streamInfo @3 :Text;
    stats @4 :Void;
    streamDelete @5 :Text;
    meshStatus @6 :Void;
  }
}

struct BrokerStats {
  brokerName @0 :Text;
  uptimeMs @1 :UInt64;
  clients @2 :UInt32;
  subscriptions @3 :UInt32;
  messagesIn @4 :UInt64;
  messagesOut @5 :UInt64;
  bytesIn @6 :UInt64;
  bytesOut @7 :UInt64;
  slowConsumerDrops @8 :UInt64;
  malformedFrames @9 :UInt64;
  duplicatesDropped @10 :UInt64;
  authFailures @11 :UInt32;
  clientStats @12 :List(ClientStats);
}

struct ClientStats {
  name @0 :Text;
  messagesOut @1 :UInt64;
  drops @2 :UInt64;
  queuedBytes @3 :UInt64;
}

struct AdminReply {
  correlation @0 :UInt64;
  error @1 :Error;
  union {
    ok @2 :Void;
    streams @3 :List(StreamInfo);
    stream @4 :StreamInfo;
    stats @5 :BrokerStats;
    mesh @6 :MeshStatus;
  }
}

struct Frame {
  version @0 :UInt16;
  union {
    hello @1 :Hello;
    helloOk @2 :HelloOk;
    error @3 :Error;
    publish @4 :Publish;
    deliver @5 :Deliver;
    subscribe @6 :Subscribe;
    unsubscribe @7 :Unsubscribe;
    publishAcks @8 :PublishAcks;
    consumerAck @9 :ConsumerAck;
    admin @10 :AdminRequest;
    adminReply @11 :AdminReply;
    ping @12 :UInt64;
    pong @13 :UInt64;
    subscribed @14 :UInt64;   # broker confirms a subscription is active
    bye @15 :Void;            # the client is closing: the broker ends the session now
    forward @16 :Forward;     # broker <-> broker data over a link
    forwardAck @17 :UInt64;
    interest @18 :Interest;   # broker <-> broker subscription interest
    resendFrom @19 :UInt64;   # the receiver could not take this forward seq (its outbox is full): resend from it
  }
}
