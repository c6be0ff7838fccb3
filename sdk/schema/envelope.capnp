@0xfa5081af12aaab93;
# The tracemesh envelope: one message as it travels between clients and brokers.
#
# A batch frame (see frame.capnp) carries many envelopes; each envelope is a
# complete Cap'n Proto message in standard stream framing, so a broker can
# forward one verbatim (a memcpy) without re-encoding it.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("tracemesh::wire");

struct MessageId {
  # 128-bit message id. Unique per message across the mesh.
  hi @0 :UInt64;
  lo @1 :UInt64;
}

enum DataClass {
  unspecified @0;
  timeSeries @1;
  image @2;
  document @3;
  quality @4;
  energy @5;
  log @6;
  model @7;
  command @8;
}

enum Sensitivity {
  public @0;
  internal @1;
  confidential @2;
  restricted @3;
}

struct Labels {
  dataClass @0 :DataClass;
  sensitivity @1 :Sensitivity;
  regions @2 :List(Text);     # residency: regions the data may be stored/processed in; empty = any
}

struct Header {
  key @0 :Text;
  value @1 :Text;
}

struct Envelope {
  # Hot fields first and inline; everything that is usually absent lives in
  # `trace`, a null pointer when unused, so a plain message stays small.
  idHi @0 :UInt64;            # 128-bit message id, unique across the mesh
  idLo @1 :UInt64;
  topic @2 :Text;
  producer @3 :Text;          # principal name from the producer's credential
  sequence @4 :UInt64;        # per-producer sequence, starts at 1
  publishedAtNs @5 :Int64;    # producer wall clock, ns since the Unix epoch
  flags @6 :UInt32;           # bit set of the flag constants below
  payload @7 :Data;           # plaintext, or ciphertext when sealed
  trace @8 :Trace;
  path @9 :List(Text);        # brokers visited, in order; the first is where it entered the mesh.
                              # Each broker appends itself when it forwards a copy over a link.
  groups @10 :List(Text);     # queue groups the receiving broker is to serve with this copy: the
                              # sender chose it for them. Set per link copy; empty = serve none.
}

struct Trace {
  labels @0 :Labels;
  parents @1 :List(MessageId);  # lineage: messages this one was derived from
  originBroker @2 :Text;      # broker that first accepted the message
  unusedPath @3 :List(Text);  # never written: the visited path is Envelope.path
  replyTo @4 :Text;           # request/reply: the requester's inbox topic
  headers @5 :List(Header);
  signature @6 :Data;         # optional Ed25519 signature by the producer
}

const flagDurable :UInt32 = 1;    # publisher wants a broker ack after the write is on disk
const flagRetain :UInt32 = 2;     # broker keeps this as the topic's last value
const flagSealed :UInt32 = 4;     # payload is ciphertext
const flagRequest :UInt32 = 8;    # a request: the broker answers "no responders" when nobody listens
