// LinkInterest: the interest one federation link is told of, collapsed.
//
// An interest key is a topic filter plus an optional queue group
// (interest_key()). For each link the broker wants every key that some origin
// other than the link wants (split horizon). Telling the peer all of them would
// make it forward a message over the link once per matching key, so a
// LinkInterest keeps the wanted set and advertises only its minimal cover: a
// wanted key is not advertised while another wanted key of the same queue group
// covers it (topic::covers; plain covers plain, group g covers group g only).
// Of filters that cover each other (`#` and `+/#`) the one first in byte order
// is advertised.
//
// It also tracks what the peer was told, and hands out the difference as one
// update (update() / sent()); a new LinkInterest's first update is a reset,
// so a link that comes up gets a fresh one. When a covering key is withdrawn, the keys it hid
// are added in the same update that removes it; the peer applies an Interest
// frame at once, so its interest never has a gap in between.
//
// Threading: one thread (the broker loop) uses a LinkInterest.
#pragma once

#include <cstddef>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tracemesh::broker {

// The key of a filter and a queue group ("" = none): "filter\0group".
std::string interest_key(std::string_view filter, std::string_view group);
// The filter and the queue group of a key; views into `key`.
std::pair<std::string_view, std::string_view> split_interest_key(std::string_view key);
// A key as people read it: "plant/#", or "jobs/+ (group workers)".
std::string interest_label(std::string_view key);

class LinkInterest {
 public:
  // What the peer must be told: with `reset`, forget everything told before and
  // take `add` (then the whole advertised set); `remove` is empty then.
  struct Update {
    bool reset = false;
    std::vector<std::string> add, remove;  // keys
  };

  // `key` is wanted for the link from now on (a no-op when it already is).
  void want(const std::string& key);
  // `key` is no longer wanted for the link (a no-op when it was not).
  void unwant(const std::string& key);
  bool wants(std::string_view key) const;

  // The keys advertised to the peer: the minimal cover of the wanted ones, in
  // key order.
  std::vector<std::string> advertised() const;

  // Whether the peer must be told something.
  bool pending() const { return reset_ || !add_.empty() || !remove_.empty(); }
  // What to tell the peer now; call sent() once it is on its way.
  Update update() const;
  void sent();

 private:
  struct Group {
    std::set<std::string, std::less<>> wanted, advertised;  // filters
  };
  void advertise(const std::string& group, const std::string& filter);
  void withdraw(const std::string& group, const std::string& filter);

  std::map<std::string, Group, std::less<>> groups_;  // by queue group, "" = plain
  // Not yet told: advertised keys the peer lacks, and keys it holds that are not advertised.
  std::set<std::string> add_, remove_;
  bool reset_ = true;  // the peer knows nothing yet: tell it the whole set
};

}  // namespace tracemesh::broker
