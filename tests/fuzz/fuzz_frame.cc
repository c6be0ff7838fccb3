// libFuzzer target for everything a broker decodes from the network: control
// frames, batch bodies of envelopes (and the visited-path stamp it writes into
// them), and credentials inside Hello.
//
// Input layout: byte 0 selects what the rest is fed to.
#include <cstdint>
#include <cstring>

#include "codec/envelope_codec.h"
#include "tracemesh/identity.h"

using namespace tracemesh;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0] % 3;
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
  } else {
    (void)Credential::parse(std::string(reinterpret_cast<const char*>(data), size));
    (void)Credential::from_armored(std::string(reinterpret_cast<const char*>(data), size));
  }
  return 0;
}
