// EnvelopeView: the fields a broker routes on (id, flags, topic, payload size, visited path,
// delegated groups), read straight from an envelope's words.
//
// A broker reads every envelope it takes in; a Cap'n Proto reader per envelope costs more
// than the rest of routing together (arena set-up, a pointer walk per field). The view
// checks once, up front, everything it will read: one segment, near pointers, every list in
// bounds, every text NUL-terminated. Envelopes as the encoders here write them (and as
// canonical_envelope() rewrites anything else) always pass; anything else is refused, never
// read past its end.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "codec/word_buffer.h"
#include "tracemesh/client.h"
#include "tracemesh/status.h"

namespace tracemesh::codec {

// A List(Text) of an envelope that EnvelopeView::parse checked: names on the visited path,
// delegated group names.
class TextList {
 public:
  size_t size() const { return len_; }
  std::string_view operator[](size_t i) const;
  bool contains(std::string_view name) const;

 private:
  friend class EnvelopeView;
  const uint64_t* slots_ = nullptr;  // the list's element pointers
  size_t len_ = 0;
};

class EnvelopeView {
 public:
  // Reads envelope `env` (`n` bytes, 8-byte aligned, one message as envelope_size() delimits
  // it). False when it is not one segment of near, in-bounds pointers with NUL-terminated texts:
  // read it with EnvelopeReader, or rewrite it with canonical_envelope() and parse that.
  bool parse(const uint8_t* env, size_t n);

  MessageId id() const { return {id_hi_, id_lo_}; }
  uint32_t flags() const { return flags_; }
  std::string_view topic() const { return topic_; }
  size_t payload_size() const { return payload_size_; }
  const TextList& path() const { return path_; }
  const TextList& groups() const { return groups_; }

 private:
  uint64_t id_hi_ = 0, id_lo_ = 0;
  uint32_t flags_ = 0;
  std::string_view topic_;
  size_t payload_size_ = 0;
  TextList path_, groups_;
};

// Writes to `out` (cleared first) the envelope `env` (`n` bytes) decoded and encoded again as one
// segment, as the encoders here write it, so that EnvelopeView can read it. Errors (protocol)
// when it cannot be decoded.
Status canonical_envelope(const uint8_t* env, size_t n, WordBuffer& out);

}  // namespace tracemesh::codec
