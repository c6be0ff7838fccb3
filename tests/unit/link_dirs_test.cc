// The directory names of accepted links' outboxes: plain names stay as they are, nothing a
// credential name holds can step outside data_dir/links, and every name reads back.
#include "federation/link_dirs.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace tracemesh::broker {
namespace {

TEST(LinkDirs, PlainNamesStayReadable) {
  EXPECT_EQ(accepted_link_dir("edge-1"), "accepted-edge-1");
  EXPECT_EQ(accepted_link_dir("edge.site_2"), "accepted-edge.site_2");
}

TEST(LinkDirs, NoNameLeavesTheLinksDirectoryAndEveryNameReadsBack) {
  const std::vector<std::string> names = {"..",      ".",       "../../etc", "a/b",  "a..b",
                                         ".hidden", "trailing.", "plant 1", std::string("nul\0byte", 8),
                                         "naïve",   "100%"};
  for (const std::string& name : names) {
    SCOPED_TRACE(name);
    const std::string dir = accepted_link_dir(name);
    EXPECT_EQ(dir.find('/'), std::string::npos);
    EXPECT_EQ(dir.find(".."), std::string::npos);
    EXPECT_EQ(dir.find('\0'), std::string::npos);
    EXPECT_NE(dir.back(), '.');
    EXPECT_EQ(accepted_link_peer(dir), name);
  }
}

TEST(LinkDirs, OtherDirectoriesAreNotAcceptedLinks) {
  EXPECT_EQ(accepted_link_peer("centre"), "");
  EXPECT_EQ(accepted_link_peer("accepted-"), "");
  EXPECT_EQ(accepted_link_peer("accepted-bad%2"), "");
  EXPECT_EQ(accepted_link_peer("accepted-bad%zz"), "");
}

}  // namespace
}  // namespace tracemesh::broker
