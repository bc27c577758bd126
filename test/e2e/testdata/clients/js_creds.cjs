// The AWS SDK for JavaScript v3's instance metadata credential provider, with its
// defaults. NODE_PATH points at the test's npm cache. Prints one JSON line.
const { fromInstanceMetadata } = require("@aws-sdk/credential-providers");

fromInstanceMetadata()()
  .then((c) => console.log(JSON.stringify({ access_key_id: c.accessKeyId })))
  .catch((e) => {
    console.log(JSON.stringify({ error: `${e.name}: ${e.message}` }));
    process.exit(1);
  });
