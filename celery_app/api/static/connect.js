// Copyable connection lines for a TCP instance (issue 25): what a player pastes into a
// terminal or a pwntools script. Behind the ingress ("tls://host:port") the service speaks
// TLS with the host as SNI; a published port ("tcp://host:port") is plain TCP.
// Shared by the team dashboard (app.js); node loads it too, for its unit tests.
(function (scope) {
  // Host names, IPv4 and bracketed IPv6 only: nothing that could break out of a quoted line.
  const TLS = /^tls:\/\/([A-Za-z0-9.-]+):(\d{1,5})$/;
  const TCP = /^tcp:\/\/([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$/;

  function connectLines(url) {
    const t = TLS.exec(url || "");
    if (t) {
      const [host, port] = [t[1], t[2]];
      return [
        { tool: "ncat", line: `ncat --ssl ${host} ${port}` },
        { tool: "openssl", line: `openssl s_client -quiet -connect ${host}:${port} -servername ${host}` },
        { tool: "pwntools", line: `remote("${host}", ${port}, ssl=True, sni="${host}")` },
      ];
    }
    const m = TCP.exec(url || "");
    if (m) {
      const host = m[1].replace(/^\[|\]$/g, "");
      return [
        { tool: "nc", line: `nc ${host} ${m[2]}` },
        { tool: "pwntools", line: `remote("${host}", ${m[2]})` },
      ];
    }
    return [];
  }

  scope.ctfConnectLines = connectLines;
  if (typeof module !== "undefined" && module.exports) module.exports = { connectLines };
})(typeof window !== "undefined" ? window : globalThis);
