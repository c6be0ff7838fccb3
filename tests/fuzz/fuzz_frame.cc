// libFuzzer target for everything a broker decodes from the network: control
// frames, batch bodies of envelopes (read by the broker's EnvelopeView, checked
// against Cap'n Proto's reader, and the visited-path stamp it writes into them),
// credentials inside Hello, and the records of a unix:// or native:// stream (in the clear,
// or behind the native:// encryption handshake).
//
// Input layout: byte 0 selects what the rest is fed to.
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "codec/envelope_codec.h"
#include "codec/envelope_view.h"
#include "codec/frame_stream.h"
#include "tracemesh/identity.h"

using namespace tracemesh;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0] % 4;
  ++data;
  --size;
  if (mode == 0) {
    zmq::message_t msg(data, size);
    codec::FrameReader reader(msg);
    if (reader.status().ok()) {
      try {
        auto frame = reader.root();
        switch (frame.which()) {
          case wire::Frame::HELLO: {
            auto c = frame.getHello().getCredential();
            (void)Credential::parse(std::string(reinterpret_cast<const char*>(c.begin()), c.size()));
            break;
          }
          case wire::Frame::SUBSCRIBE:
            (void)validate_filter(frame.getSubscribe().getPattern().cStr());
            break;
          case wire::Frame::DELIVER:
            for (auto d : frame.getDeliver().getDeliveries()) (void)d.getSubscription();
            for (auto r : frame.getDeliver().getRuns()) (void)(r.getCount() + r.getFirstStreamSeq());
            break;
          default:
            break;
        }
      } catch (const kj::Exception&) {
      }
    }
  } else if (mode == 1) {
    // A batch body, as the broker sees it after aligning.
    codec::WordBuffer aligned;
    aligned.append(data, size & ~size_t{7});
    (void)codec::for_each_envelope(aligned.data(), aligned.size(), 0, [](const uint8_t* p, size_t n) {
      try {
        codec::EnvelopeReader reader(p, n);
        auto env = reader.root();
        (void)validate_topic(std::string_view(env.getTopic().cStr(), env.getTopic().size()));
        (void)env.getPayload().size();
        if (env.hasTrace()) {
          for (auto parent : env.getTrace().getParents()) (void)parent.getHi();
        }
      } catch (const kj::Exception&) {
      }
      // The broker's own reader must accept only what Cap'n Proto reads, and read the same.
      codec::EnvelopeView view;
      if (view.parse(p, n)) {
        try {
          codec::EnvelopeReader reader(p, n);
          auto env = reader.root();
          if (view.topic() != std::string_view(env.getTopic().cStr(), env.getTopic().size()) ||
              view.id().lo != env.getIdLo() || view.flags() != env.getFlags() ||
              view.payload_size() != env.getPayload().size() || view.path().size() != env.getPath().size() ||
              view.groups().size() != env.getGroups().size())
            __builtin_trap();
          for (unsigned i = 0; i < env.getPath().size(); ++i)
            if (view.path()[i] != std::string_view(env.getPath()[i].cStr(), env.getPath()[i].size())) __builtin_trap();
        } catch (const kj::Exception&) {
          __builtin_trap();  // the view read what Cap'n Proto refuses
        }
      }
      // What a broker does to every envelope it forwards over a link: stamp the visited path,
      // then read the result back as the next broker would.
      codec::WordBuffer stamped;
      if (auto m = codec::append_visited(stamped, p, n, "fuzz-broker"); m.ok()) {
        try {
          codec::EnvelopeReader next(stamped.data(), *m);
          for (auto hop : next.root().getPath()) (void)hop.size();
        } catch (const kj::Exception&) {
        }
      }
      return true;
    });
  } else if (mode == 3) {
    // Bytes a peer writes to a unix:// or native:// socket, read back as records; with bit 7
    // of the selector set, by an encrypting native:// listener (handshake, then sealed records).
    const bool encrypted = data[-1] & 0x80;
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) return 0;
    if (size > 0 && ::write(fds[0], data, size) != static_cast<ssize_t>(size)) {
      ::close(fds[0]);
      ::close(fds[1]);
      return 0;
    }
    ::close(fds[0]);
    codec::FrameStream stream(fds[1], 1 << 20);
    if (encrypted) {
      static const Identity listener = Identity::generate();
      stream.encrypt_as_acceptor(listener.curve_public_key(), listener.curve_secret_key());
    }
    zmq::message_t header;
    std::optional<zmq::message_t> body;
    while (true) {
      while (stream.next(header, body)) {
        codec::FrameReader reader(header);
        if (reader.status().ok()) {
          try {
            (void)reader.root().which();
          } catch (const kj::Exception&) {
          }
        }
      }
      if (!stream.fill()) break;
    }
  } else {
    (void)Credential::parse(std::string(reinterpret_cast<const char*>(data), size));
    (void)Credential::from_armored(std::string(reinterpret_cast<const char*>(data), size));
  }
  return 0;
}
