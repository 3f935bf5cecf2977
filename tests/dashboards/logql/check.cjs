// Parse LogQL queries with Grafana's LogQL grammar (the one Grafana's query editor uses).
// stdin: a JSON list of queries; stdout: a JSON list of {query, errors: [offsets]}.
const { parser } = require("@grafana/lezer-logql");

const queries = JSON.parse(require("fs").readFileSync(0, "utf8"));
const out = queries.map((query) => {
  const errors = [];
  parser.parse(query).iterate({
    enter: (node) => {
      if (node.type.isError) errors.push(node.from);
    },
  });
  return { query, errors };
});
process.stdout.write(JSON.stringify(out));
