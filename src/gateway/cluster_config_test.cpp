#include "gateway/cluster_config.h"

#include <gtest/gtest.h>

#include <map>

namespace pdserve {
namespace {

constexpr std::string_view kTwoScenarios = R"(
model = "/models/m.gguf"
transport = "tcp"

[gateway]
port = 9000
default_scenario = "chat"
stream_threads = 8

[instance_defaults]
threads = 1
prefill_slots = 2

[[scenario]]
name = "chat"
models = ["chat"]
system_prompt_prefixes = ["You are a helpful"]
ttft_budget_ms = 2000
ttft_budget_ms_per_token = 0.5

[[scenario]]
name = "code"
decode_wait_ms = 1000

[[instance]]
role = "prefill"
port = 9101
prefill_slots = 4
no_prefix_caching = true

[[instance]]
role = "decode"
port = 9201
kv_cache_memory = "256MiB"

[[instance]]
scenario = "code"
role = "prefill"
port = 9102

[[instance]]
name = "code-dec"
scenario = "code"
role = "decode"
host = "127.0.0.2"
port = 9202
)";

TEST(ClusterConfig, ParsesScenariosInstancesAndDefaults) {
  StatusOr<ClusterConfig> c = parse_cluster_config(kTwoScenarios, "cluster.toml");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->model, "/models/m.gguf");
  EXPECT_EQ(c->transport, "tcp");
  EXPECT_EQ(c->gateway.port, 9000);
  EXPECT_EQ(c->gateway.host, "127.0.0.1");
  EXPECT_EQ(c->gateway.admission, "on-demand");
  EXPECT_EQ(c->gateway.stream_threads, 8);
  ASSERT_EQ(c->scenarios.size(), 2u);
  EXPECT_EQ(c->scenarios[0].name, "chat");
  EXPECT_EQ(c->scenarios[0].models, std::vector<std::string>{"chat"});
  EXPECT_EQ(c->scenarios[0].system_prompt_prefixes, std::vector<std::string>{"You are a helpful"});
  EXPECT_EQ(c->scenarios[0].ttft_budget_ms, 2000);
  EXPECT_DOUBLE_EQ(c->scenarios[0].ttft_budget_ms_per_token, 0.5);
  EXPECT_EQ(c->scenarios[1].ttft_budget_ms, 60'000);
  EXPECT_EQ(c->scenarios[1].decode_wait_ms, 1000);
  ASSERT_EQ(c->instances.size(), 4u);
  const InstanceConfig& p0 = c->instances[0];
  EXPECT_EQ(p0.scenario, "chat");  // the default scenario
  EXPECT_EQ(p0.name, "chat-prefill-0");
  EXPECT_EQ(p0.address(), "127.0.0.1:9101");
  // Defaults first, the instance's own value replaces the default's.
  using Flags = std::map<std::string, std::string>;
  auto flags = [](const InstanceConfig& i) { return Flags(i.flags.begin(), i.flags.end()); };
  EXPECT_EQ(p0.flags.size(), 3u);
  EXPECT_EQ(flags(p0), (Flags{{"--threads", "1"}, {"--prefill-slots", "4"}, {"--no-prefix-caching", ""}}));
  EXPECT_EQ(c->instances[1].flags.size(), 3u);
  EXPECT_EQ(flags(c->instances[1]),
            (Flags{{"--threads", "1"}, {"--prefill-slots", "2"}, {"--kv-cache-memory", "256MiB"}}));
  EXPECT_EQ(flags(c->instances[2]), (Flags{{"--threads", "1"}, {"--prefill-slots", "2"}}));
  EXPECT_EQ(c->instances[3].name, "code-dec");
  EXPECT_EQ(c->instances[3].address(), "127.0.0.2:9202");
}

// One prefill and one decode instance, nothing else: the smallest valid file.
const std::string ok_instances = R"(
[[instance]]
role = "prefill"
port = 9101
[[instance]]
role = "decode"
port = 9201
)";

TEST(ClusterConfig, AFileWithOnlyInstancesServesOneDefaultScenario) {
  StatusOr<ClusterConfig> c = parse_cluster_config(ok_instances, "c.toml");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  ASSERT_EQ(c->scenarios.size(), 1u);
  EXPECT_EQ(c->scenarios[0].name, "default");
  EXPECT_EQ(c->gateway.default_scenario, "default");
  EXPECT_EQ(c->gateway.stream_threads, 4);
  EXPECT_EQ(c->transport, "shm");
}

// Each bad file fails with a message naming the place and the fix.
TEST(ClusterConfig, BadFilesFailWithTheLineAndKey) {
  struct Case {
    std::string text;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"model = ", "c.toml:1:"},  // not TOML
      {std::string("model = \"a\0\"\n", 13), "c.toml:1:11: not valid TOML: control character U+0000"},
      {std::string("[\0[instance]]\n", 14), "c.toml:1:2: not valid TOML: control character U+0000"},
      {"[[(ads\"\nport = 1\n", "c.toml:1:3: not valid TOML: expected a key"},
      {"[[\nrole = 1\n", "c.toml:1:3: not valid TOML: expected a key"},
      {"t\xEF\xBB\x9F", "c.toml:1:2: not valid TOML: expected '=' after the key 't'"},
      {"models = [\n  \"a\",\n]\n[ +x]\n", "c.toml:4:3: not valid TOML: expected a key"},
      {"modle = \"x\"\n" + ok_instances, "c.toml:1:9: modle: unknown key"},  // a typo
      {"transport = \"udp\"\n" + ok_instances, "transport: must be \"shm\""},
      {"[gateway]\nport = 70000\n" + ok_instances, "gateway.port: must be in [0, 65535], not 70000"},
      {"[gateway]\nadmission = \"fifo\"\n" + ok_instances, "gateway.admission"},
      {"[gateway]\nstream_threads = 0\n" + ok_instances,
       "gateway.stream_threads: must be in [1, 256], not 0"},
      {"[gateway]\ndefault_scenario = \"x\"\n" + ok_instances,
       "default_scenario \"x\" is not a [[scenario]]"},
      {"[[scenario]]\nname = \"a b\"\n" + ok_instances, "scenario[0].name: must be 1 to 64 characters"},
      {"[[scenario]]\nmodels = [\"m\"]\n" + ok_instances, "a scenario needs a name"},
      {"[[scenario]]\nname = \"a\"\nmodels = [1]\n" + ok_instances,
       "scenario[0].models: must be an array of strings"},
      {"[[scenario]]\nname = \"a\"\nttft_budget_ms = \"5s\"\n" + ok_instances,
       "must be an integer, not a string"},
      {"[[scenario]]\nname = \"a\"\n[[scenario]]\nname = \"a\"\n" + ok_instances,
       "c.toml:3: a second scenario named \"a\" (the first is at line 1)"},
      {"[[scenario]]\nname = \"a\"\nmodels=[\"m\"]\n[[scenario]]\nname = \"b\"\nmodels=[\"m\"]\n" +
           ok_instances,
       "c.toml:4: the model name \"m\" is listed by scenario \"a\" and by \"b\""},
      {"[[instance]]\nrole = \"prefill\"\n", "instance[0]: port is required"},
      {"[[instance]]\nport = 1\n", "role is required"},
      {"[[instance]]\nrole = \"mixed\"\nport = 1\n", "instance[0].role: must be \"prefill\" or \"decode\""},
      {"[[instance]]\nrole = \"prefill\"\nport = 1\nthreads = \"2\"\n",
       "instance[0].threads: must be an integer"},
      {"[[instance]]\nrole = \"prefill\"\nport = 1\nthread = 2\n", "instance[0].thread: unknown key"},
      {"[[instance]]\nrole = \"prefill\"\nport = 9101\nscenario = \"x\"\n", "scenario \"x\", which is not"},
      {ok_instances + "[[instance]]\nrole = \"decode\"\nport = 9201\n",
       "c.toml:8: instance default-decode-1 listens on 127.0.0.1:9201, as does default-decode-0 "
       "(127.0.0.1:9201)"},
      {"[gateway]\nhost = \"0.0.0.0\"\nport = 9101\n" + ok_instances,
       "instance default-prefill-0 listens on 127.0.0.1:9101, as does the gateway (0.0.0.0:9101)"},
      {"[[instance]]\nrole = \"prefill\"\nport = 9101\n", "scenario \"default\" has no decode instance"},
      {"instance = 3\n", "instance: must be an array of tables"},
      {"[[scenario]]\nname = \"a\"\nsystem_prompt_prefixes = [\"x\"]\n[[scenario]]\nname = \"b\"\n"
       "system_prompt_prefixes = [\"x\"]\n" +
           ok_instances,
       "c.toml:4: the system prompt prefix \"x\" is listed by scenario \"a\" and by \"b\""},
      {"[[scenario]]\nname = \"a\"\nmodels = [\"m\", \"m\"]\n" + ok_instances,
       "c.toml:1: scenario \"a\" lists the model name \"m\" twice"},
      {"[instance_defaults]\nrole = \"prefill\"\n" + ok_instances, "instance_defaults.role: unknown key"},
      {"[instance_defaults]\nkv_cache_memory = \"\"\n" + ok_instances,
       "instance_defaults.kv_cache_memory: is empty"},
  };
  for (const Case& c : cases) {
    StatusOr<ClusterConfig> r = parse_cluster_config(c.text, "c.toml");
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << c.text;
    EXPECT_NE(r.status().message().find(c.expect), std::string::npos)
        << "expected '" << c.expect << "' in: " << r.status().message();
  }
}

// Brackets and '#' inside strings, multi-line strings whose lines start with '[', headers with
// spaces and quoted keys, comments after headers, non-ASCII text in strings and comments.
TEST(ClusterConfig, ValidTomlCorners) {
  StatusOr<ClusterConfig> c = parse_cluster_config(R"toml(
[ "gateway" ]   # a quoted header name
port = 9000
[[scenario]]
name = "a"
system_prompt_prefixes = [
  """You are
[(not a header)""",
  '# not a comment',
  "[\"x]",
  "Vous êtes un assistant",  # non-ASCII in strings and comments: déjà vu
]
[[ instance ]]
role = "prefill"
port = 9101
[[instance]]
role = "decode"
port = 9201
)toml",
                                                   "c.toml");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->gateway.port, 9000);
  EXPECT_EQ(c->scenarios[0].system_prompt_prefixes,
            (std::vector<std::string>{"You are\n[(not a header)", "# not a comment", "[\"x]",
                                      "Vous êtes un assistant"}));
  EXPECT_EQ(c->instances.size(), 2u);
}

TEST(ClusterConfig, AMissingFileIsNotFound) {
  EXPECT_EQ(load_cluster_config("/nonexistent/cluster.toml").status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace pdserve
