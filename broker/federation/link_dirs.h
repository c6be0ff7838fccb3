// Where a link's outbox lives under data_dir/links: a dialed link under its configured name, a
// link a peer opened under "accepted-" and the peer's credential name, escaped so that no name
// can reach outside that directory (and read back at start-up, to bring such links back).
#pragma once

#include <string>
#include <string_view>

namespace tracemesh::broker {

// "accepted-" and `peer`, every byte but [A-Za-z0-9_-] as %XX; a '.' stays only between two
// other characters and never next to another '.' (so "." and ".." cannot come out).
std::string accepted_link_dir(std::string_view peer);

// The peer's name from a directory name accepted_link_dir made; empty when it is not one.
std::string accepted_link_peer(std::string_view dir);

}  // namespace tracemesh::broker
