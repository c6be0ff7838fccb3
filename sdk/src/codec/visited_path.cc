// Stamping a broker into an envelope's visited path as it crosses a link.
//
// Every forwarded message is stamped, so the usual case (one segment, as every encoder here
// writes it) is an edit of the Cap'n Proto words in place: the envelope is copied verbatim, a
// new path list (the old entries, re-pointed, plus one) and the broker's name are appended at
// the end of the segment, and the envelope's path pointer is turned to the new list; the old
// list stays behind as unreachable words. An envelope sent without its trailing null pointers
// gets its pointer slots back on the way (the words after them move down). Anything else
// (several segments, another layout, a far pointer) takes the general path: decode, copy,
// re-encode.
#include <capnp/message.h>
#include <capnp/serialize.h>

#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "codec/capnp_words.h"
#include "codec/envelope_codec.h"

namespace tracemesh::codec {
namespace {

using namespace words;

// Where the in-place edit writes, found in the input segment (word indexes into it).
struct Plan {
  size_t seg_words = 0;
  size_t path_slot = 0;  // the envelope's path pointer (its groups pointer follows)
  size_t old_list = 0, old_len = 0;
  // An envelope written without its trailing null pointers (see append_segment) is widened
  // first: `widen` null slots go in at word `widen_at`, and the pointers before them move
  // their targets by as much.
  size_t widen = 0, widen_at = 0, kept_from = 0, kept = 0;
};

// False when the envelope is not one this edit handles; the caller re-encodes it instead.
bool plan_in_place(const uint8_t* env, size_t n, Plan& plan) {
  const uint64_t* seg = single_segment(env, n, plan.seg_words);
  if (!seg) return false;
  const uint64_t root = seg[0];
  if (root == 0 || pointer_type(root) != kStructPointer) return false;
  const int64_t env_start = 1 + pointer_offset(root);
  const uint64_t data_words = struct_data_words(root), pointers = struct_pointers(root);
  if (!in_bounds(env_start, data_words + pointers, plan.seg_words)) return false;
  if (pointers <= kEnvelopePath) {
    // No path or groups slot (the encoder left out trailing null pointers): widen the struct
    // in the copy. Only a root struct right after the root pointer, as encoders lay it out,
    // whose pointers are lists or null; anything else is re-encoded.
    if (env_start != 1) return false;
    plan.kept_from = 1 + data_words;
    plan.kept = pointers;
    for (size_t i = 0; i < pointers; ++i) {
      const uint64_t p = seg[plan.kept_from + i];
      if (p != 0 && pointer_type(p) != kListPointer && pointer_type(p) != kStructPointer) return false;
    }
    plan.widen = kEnvelopePointers - pointers;
    plan.widen_at = plan.kept_from + pointers;
    plan.path_slot = plan.kept_from + kEnvelopePath;
    return true;
  }
  if (pointers == kEnvelopeGroups) return false;  // a path slot but no groups slot: re-encode
  plan.path_slot = env_start + data_words + kEnvelopePath;
  const uint64_t path = seg[plan.path_slot];
  if (path == 0) return true;
  if (pointer_type(path) != kListPointer || ((path >> 32) & 7) != kPointerElements) return false;
  const int64_t list = static_cast<int64_t>(plan.path_slot) + 1 + pointer_offset(path);
  plan.old_len = path >> 35;
  if (!in_bounds(list, plan.old_len, plan.seg_words)) return false;
  plan.old_list = list;
  for (size_t i = 0; i < plan.old_len; ++i) {
    const uint64_t e = seg[plan.old_list + i];
    if (e != 0 && pointer_type(e) != kListPointer) return false;  // far pointers: general path
  }
  return true;
}

// Writes `text` NUL-terminated at word `at` of `seg` and returns the Text pointer to it from `slot`.
uint64_t put_text(uint64_t* seg, size_t at, size_t slot, std::string_view text) {
  const size_t words = (text.size() + 8) / 8;
  std::memset(seg + at, 0, words * 8);
  std::memcpy(seg + at, text.data(), text.size());
  return make_pointer(kListPointer, static_cast<int64_t>(at) - static_cast<int64_t>(slot + 1),
                      kByteElements | (uint64_t{text.size() + 1} << 3));
}

Result<size_t> append_visited_general(WordBuffer& out, const uint8_t* env, size_t n, std::string_view broker,
                                      std::span<const std::string_view> groups) {
  return rewrite_envelope(env, n, out, "cannot stamp the visited path", [&](wire::Envelope::Builder root) {
    std::vector<std::string> path;
    for (auto p : root.asReader().getPath()) path.emplace_back(p.cStr(), p.size());
    auto list = root.initPath(static_cast<unsigned>(path.size() + 1));
    for (size_t i = 0; i < path.size(); ++i) list.set(i, path[i]);
    list.set(path.size(), capnp::Text::Reader(broker.data(), broker.size()));
    if (groups.empty()) {
      root.disownGroups();
    } else {
      auto g = root.initGroups(static_cast<unsigned>(groups.size()));
      for (size_t i = 0; i < groups.size(); ++i) g.set(i, capnp::Text::Reader(groups[i].data(), groups[i].size()));
    }
  });
}

}  // namespace

Result<size_t> append_visited(WordBuffer& out, const uint8_t* env, size_t n, std::string_view broker,
                              std::span<const std::string_view> groups) {
  Plan plan;
  if (!plan_in_place(env, n, plan)) return append_visited_general(out, env, n, broker, groups);
  const size_t name_words = (broker.size() + 8) / 8;
  size_t group_words = groups.size();
  for (auto g : groups) group_words += (g.size() + 8) / 8;
  const size_t seg_words = plan.seg_words + plan.widen + plan.old_len + 1 + name_words + group_words;
  if (seg_words > UINT32_MAX / 2) return append_visited_general(out, env, n, broker, groups);
  uint64_t* dst = out.grow(1 + seg_words);
  uint64_t* seg = dst + 1;
  if (plan.widen == 0) {
    std::memcpy(dst, env, n);
  } else {
    const auto* in = reinterpret_cast<const uint64_t*>(env + 8);
    std::memcpy(seg, in, plan.widen_at * 8);
    std::memset(seg + plan.widen_at, 0, plan.widen * 8);
    std::memcpy(seg + plan.widen_at + plan.widen, in + plan.widen_at, (plan.seg_words - plan.widen_at) * 8);
    seg[0] = with_pointers(seg[0], kEnvelopePointers);
    for (size_t i = 0; i < plan.kept; ++i) {
      uint64_t& p = seg[plan.kept_from + i];
      if (p != 0) p = moved_target(p, static_cast<int64_t>(plan.widen));
    }
  }
  const uint32_t table[2] = {0, static_cast<uint32_t>(seg_words)};
  std::memcpy(dst, table, 8);
  // The new path list: the old entries pointing at the same texts, then this broker.
  const size_t list = plan.seg_words + plan.widen;
  for (size_t i = 0; i < plan.old_len; ++i) {
    const uint64_t e = seg[plan.old_list + i];
    if (e == 0) {
      seg[list + i] = 0;
      continue;
    }
    const int64_t target = static_cast<int64_t>(plan.old_list + i) + 1 + pointer_offset(e);
    seg[list + i] = make_pointer(kListPointer, target - static_cast<int64_t>(list + i + 1), e >> 32);
  }
  seg[list + plan.old_len] = put_text(seg, list + plan.old_len + 1, list + plan.old_len, broker);
  seg[plan.path_slot] =
      make_pointer(kListPointer, static_cast<int64_t>(list) - static_cast<int64_t>(plan.path_slot + 1),
                   kPointerElements | (uint64_t{plan.old_len + 1} << 3));
  // The groups this copy is delegated: replaces what the sender delegated to us.
  const size_t groups_slot = plan.path_slot - kEnvelopePath + kEnvelopeGroups;
  if (groups.empty()) {
    seg[groups_slot] = 0;
  } else {
    size_t cursor = list + plan.old_len + 1 + name_words;
    const size_t glist = cursor;
    cursor += groups.size();
    for (size_t i = 0; i < groups.size(); ++i) {
      seg[glist + i] = put_text(seg, cursor, glist + i, groups[i]);
      cursor += (groups[i].size() + 8) / 8;
    }
    seg[groups_slot] =
        make_pointer(kListPointer, static_cast<int64_t>(glist) - static_cast<int64_t>(groups_slot + 1),
                     kPointerElements | (uint64_t{groups.size()} << 3));
  }
  return (1 + seg_words) * 8;
}

}  // namespace tracemesh::codec
