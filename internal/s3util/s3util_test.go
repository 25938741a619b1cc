package s3util

import (
	"context"
	"net"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/internal/testkit"
)

func TestNewClientFromEnvironment(t *testing.T) {
	srv := testkit.S3(t)
	srv.Setenv(t)
	srv.CreateBucket(t, "models")
	c, err := NewClient(context.Background(), ClientOptions{})
	require.NoError(t, err)
	assert.True(t, c.Options().UsePathStyle, "a custom endpoint turns path-style on")
	out, err := c.ListBuckets(context.Background(), &s3.ListBucketsInput{})
	require.NoError(t, err)
	require.Len(t, out.Buckets, 1)
	off := false
	c, err = NewClient(context.Background(), ClientOptions{PathStyle: &off})
	require.NoError(t, err)
	assert.False(t, c.Options().UsePathStyle)
}

func TestParseURL(t *testing.T) {
	for in, want := range map[string]Location{
		"s3://models":            {Bucket: "models"},
		"s3://models/":           {Bucket: "models"},
		"s3://models/a/b/":       {Bucket: "models", Prefix: "a/b"},
		"s3://my.bucket-1/x.y_z": {Bucket: "my.bucket-1", Prefix: "x.y_z"},
	} {
		got, err := ParseURL(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, in := range []string{"models", "s3://", "s3://ab", "s3://Models", "s3://-ab/x", "s3://models//x", "s3://models/a/../b", "s3://models/a?x=1", "file:///x"} {
		_, err := ParseURL(in)
		assert.Error(t, err, in)
	}
	assert.Equal(t, "s3://models/a/b", Location{Bucket: "models", Prefix: "a"}.Child("b").String())
}

func FuzzParseURL(f *testing.F) {
	for _, s := range []string{"s3://models/a/b", "s3://x", "s3://models//", "s3://a.b-c/../x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		loc, err := ParseURL(s)
		if err != nil {
			return
		}
		again, err := ParseURL(loc.String())
		if err != nil || again != loc {
			t.Fatalf("%q → %+v → %q → %+v, %v", s, loc, loc.String(), again, err)
		}
	})
}

// TestClassify runs the failures a user meets against a real S3 server:
// a missing bucket, a missing object, refused credentials, an endpoint
// nobody listens on.
func TestClassify(t *testing.T) {
	srv := testkit.S3(t)
	srv.Setenv(t)
	srv.CreateBucket(t, "models")
	ctx := context.Background()
	c, err := NewClient(ctx, ClientOptions{})
	require.NoError(t, err)

	_, err = c.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("absent"), Key: aws.String("x")})
	require.Error(t, err)
	assert.Equal(t, NoBucket, Classify(err), "%v", err)
	assert.Contains(t, Describe(err, "absent").Error(), `bucket "absent" does not exist`)

	_, err = c.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("models"), Key: aws.String("x")})
	require.Error(t, err)
	assert.Equal(t, NoObject, Classify(err), "%v", err)

	t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
	bad, err := NewClient(ctx, ClientOptions{})
	require.NoError(t, err)
	_, err = bad.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("models"), Key: aws.String("x")})
	require.Error(t, err)
	assert.Equal(t, Denied, Classify(err), "%v", err)
	assert.Contains(t, Describe(err, "models").Error(), "check AWS_ACCESS_KEY_ID")

	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	gone, err := NewClient(ctx, ClientOptions{Endpoint: "http://" + addr})
	require.NoError(t, err)
	_, err = gone.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String("models")})
	require.Error(t, err)
	assert.Equal(t, Unreachable, Classify(err), "%v", err)
	assert.Contains(t, Describe(err, "models").Error(), "unreachable")
}
